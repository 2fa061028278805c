"""`glm eval` against lm-evaluation-harness itself, on the same checkpoint and the same local tasks:
bench/lm_eval_agreement.py builds a small model (20 training steps), runs both, and exits 1 unless
perplexity, bits per byte, acc and acc_norm agree to 4 decimals (about 35 s on 2 cores)."""

import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip("lm_eval", reason="lm-eval is part of the test extra: pip install -e '.[test]'")


def test_glm_eval_equals_lm_evaluation_harness():
    assert (ROOT / "data" / "raw" / "texts").is_dir(), "run `make data` first (make test does)"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "lm_eval_agreement.py"), "--train-steps", "20",
                           "--limit", "40"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for metric in ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        line = next(x for x in proc.stdout.splitlines() if x.startswith(metric + " "))
        assert "equal to 4 decimals" in line, line
