"""bench/gpu_check.py without a GPU: the dry run walks every step, checks the command lines it would run
(glm parses its own, bench/attention.py reaches its no-CUDA exit) and writes both report files with
every step skipped for a reason and every target listed; the parsers of its steps' outputs work on
outputs shaped like the real ones."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("glm_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _module()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-report")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True,
                          timeout=300)
    return out, proc


def test_dry_run_reports_every_step_skipped_with_a_reason(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu-report.json").read_text())
    assert report["dry_run"] is True
    steps = report["steps"]
    assert [s["name"] for s in steps] == gpu_check.STEP_NAMES
    for step in steps:
        assert step["status"] == "skipped" and step["reason"], step
        assert step["commands"], f"{step['name']}: no command line planned"
    by_name = {s["name"]: s for s in steps}
    assert "CPU-only torch" in by_name["env"]["reason"] or "no CUDA" in by_name["env"]["reason"]
    assert by_name["env"]["details"]["torch"] == torch.__version__
    # the checks a CPU can do on the planned command lines all passed
    checks = [c for s in steps for c in (s["cpu_smoke"] or {}).values() if isinstance(c, dict)]
    assert len(checks) >= 3 and all(c["status"] == "ok" for c in checks), checks
    assert any("torch.distributed.run" in c and "--nproc_per_node=1" in c for c in by_name["torchrun"]["commands"])
    assert sum("GLM_ATTENTION=fused" in c for c in by_name["pretrain"]["commands"]) == 2
    assert sum("--compile" in c for c in by_name["pretrain"]["commands"]) == 2


def test_dry_run_report_lists_the_targets(dry_run):
    out, _ = dry_run
    report = json.loads((out / "gpu-report.json").read_text())
    targets = " ".join(t["target"] for t in report["targets"])
    for wanted in (">= 0.9x", ">= 45%", ">= 1.5x"):
        assert wanted in targets
    md = (out / "gpu-report.md").read_text()
    assert "## Targets" in md and "(dry run)" in md
    for name in gpu_check.STEP_NAMES:
        assert f"## {name}:" in md and f"| {name} | skipped |" in md
    assert (out / "gpu-check.log").is_file()


def test_unknown_step_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main([str(tmp_path / "r"), "--only", "kernel,bogus"])
    assert exc.value.code == 2


def test_read_run_parses_the_engines_metrics(tmp_path):
    """tokens/s over the steps after the warm-up, MFU from the engine's own per-token FLOPs and peak,
    peak memory, the mean loss of the last ten steps."""
    records = [{"step": i, "loss": 10.0 - 0.05 * i, "tokens": 1000 * i, "step_time": 5.0 if i <= 2 else 0.5,
                "tokens_per_s": 2000.0, "mfu": 0.2, "memory_mb": 1024.0 * i} for i in range(1, 21)]
    records.insert(5, {"step": 5, "val_loss": 9.0})  # an evaluation record: no step_time
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = gpu_check.read_run(tmp_path, skip=2)
    assert stats["steps"] == 20 and stats["tokens_per_s"] == 2000
    assert stats["mfu"] == pytest.approx(0.2)
    assert stats["peak_memory_gib"] == pytest.approx(20.0)
    assert stats["loss"] == pytest.approx(10.0 - 0.05 * 15.5)


def test_output_parsers():
    text = 'log line\n{\n  "step": 6,\n  "status": "completed"\n}\nwarning after\n'
    assert gpu_check.last_json(text) == {"step": 6, "status": "completed"}
    assert gpu_check.last_json("no json here") is None
    out = "...\nFAILED tests/test_x.py::test_a - AssertionError\n== 1 failed, 40 passed, 300 deselected in 9.1s ==\n"
    assert gpu_check.pytest_summary(out) == "1 failed, 40 passed, 300 deselected in 9.1s"
    assert gpu_check.failing_lines(out).startswith("FAILED tests/test_x.py::test_a")
