"""The README's demo digits, backed by a check: the data stages run here (about 30 s) and must print
exactly the numbers in examples/demo_expected.json; the model stages (15 minutes) are checked by
`python bench/demo_digits.py --run all` or on a finished `make demo` (`python bench/demo_digits.py runs/demo`)."""

import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "bench" / "demo_digits.py"


def test_data_stages_print_the_expected_digits():
    assert (ROOT / "data" / "raw" / "texts").is_dir(), "run `make data` first (make test does)"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--run", "data"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "14 of 14 numbers as expected" in proc.stderr


def test_a_changed_digit_fails_the_check(tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "pretrain-summary.json").write_text(json.dumps({"metrics": {"val_bpb": 2.14204}}))
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import demo_digits
    finally:
        sys.path.pop(0)
    assert demo_digits.compare({"pretrain.val_bpb": "2.1420"}, demo_digits.model_digits(demo)) == []
    (demo / "pretrain-summary.json").write_text(json.dumps({"metrics": {"val_bpb": 2.14251}}))
    problems = demo_digits.compare({"pretrain.val_bpb": "2.1420", "dedup.kept": "78"},
                                   {**demo_digits.model_digits(demo), **demo_digits.data_digits(demo)})
    assert problems == ["pretrain.val_bpb: expected 2.1420, got 2.14251",
                        "dedup.kept: missing (its stage did not run or wrote no summary)"]
