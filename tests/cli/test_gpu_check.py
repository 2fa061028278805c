"""bench/gpu_check.py without a GPU, run the way a lent GPU machine runs it: by an interpreter where glm is
NOT installed, from the repository root.

The dry run plans every step and, for every planned command, imports glm's packages exactly as that
command will (its interpreter, working directory, environment and way of starting: `-m`, a script, a
torchrun worker), collects the GPU tests the tests step will run, and has glm parse its own command
lines; it fails (exit 1) when any of that fails. The bare interpreter is a throwaway venv that sees the
dependencies' site-packages directories but not glm's editable-install finder (.pth files of those
directories are not executed), so `import glm_cli.core` works there only through the repository's own
source-tree shim (glm_cli/_source_tree.py). Plus: the parsers of the steps' outputs, the env step's
verdict on a failed build, the cuDNN baseline's K/V expansion, the plan's budget and the loss comparison.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

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
plan = gpu_check.plan
probes = gpu_check._load_sibling("gpu_probes")  # what runs inside the steps' subprocesses

# What a user's shell may carry that would let glm be found some other way.
_PATH_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")


def _bare_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in _PATH_VARS}


def _dependency_dirs() -> list[str]:
    """The site-packages directories this interpreter imports torch, typer, pytest ... from, as a fresh
    process outside the repository sees them (so no working-directory entry). A venv inside the checkout
    (`make install`'s .venv, as in CI) is kept: listed in a .pth, its own .pth files (the editable
    install's finder among them) are not run, so glm still cannot be imported from it."""
    out = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path))"], cwd="/",
                         env=_bare_env(), capture_output=True, text=True, check=True, timeout=60).stdout
    return [p for p in json.loads(out) if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A Python where glm is not installed: a venv without pip whose one .pth lists the dependency
    directories. Proven bare: outside the repository `import glm_cli` fails there."""
    home = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(home)
    python = home / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], env=_bare_env(),
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    deps = _dependency_dirs()
    for d in deps:
        assert not (Path(d) / "glm_cli").is_dir(), f"glm is installed (not editable) in {d}: no bare env to make"
    Path(site, "glm_deps.pth").write_text("".join(d + "\n" for d in deps))
    probe = subprocess.run([str(python), "-c", "import torch, typer, pytest\nimport glm_cli"], cwd=home,
                           env=_bare_env(), capture_output=True, text=True, timeout=120)
    assert "No module named 'glm_cli'" in probe.stderr, f"not bare, or dependencies missing: {probe.stderr[-500:]}"
    return str(python)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, bare_python):
    out = tmp_path_factory.mktemp("gpu-report")
    proc = subprocess.run([bare_python, str(SCRIPT), str(out), "--dry-run"], cwd=ROOT, env=_bare_env(),
                          capture_output=True, text=True, timeout=400)
    return out, proc


def test_dry_run_in_a_bare_env_imports_glm_as_every_step_will(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-report.json").read_text())
    assert report["dry_run"] is True
    steps = report["steps"]
    assert [s["name"] for s in steps] == plan.STEP_NAMES
    for step in steps:
        assert step["status"] == "skipped" and step["reason"], step
        assert step["commands"], f"{step['name']}: no command line planned"
        imports = step["cpu_smoke"]["imports"]
        # one probe per planned command (shared where interpreter, start and PYTHON* env agree)
        assert imports["status"] == "ok" and imports["commands"] == len(step["commands"]), (step["name"], imports)
    by_name = {s["name"]: s for s in steps}
    assert "CPU-only torch" in by_name["env"]["reason"] or "no CUDA" in by_name["env"]["reason"]
    assert by_name["env"]["details"]["torch"] == torch.__version__
    # every CPU check of the planned command lines passed
    checks = [c for s in steps for c in (s["cpu_smoke"] or {}).values() if isinstance(c, dict)]
    assert len(checks) >= 10 and all(c["status"] == "ok" for c in checks), checks
    assert any("torch.distributed.run" in c and "--nproc_per_node=1" in c for c in by_name["torchrun"]["commands"])
    assert sum("GLM_ATTENTION=fused" in c for c in by_name["pretrain"]["commands"]) == 2
    assert sum("--compile" in c for c in by_name["pretrain"]["commands"]) == 2


def test_dry_run_collects_the_kernels_gpu_tests_without_optional_packages(dry_run):
    out, _ = dry_run
    tests = next(s for s in json.loads((out / "gpu-report.json").read_text())["steps"] if s["name"] == "tests")
    collection = tests["cpu_smoke"]["collection"]
    assert plan.KERNEL_TESTS in collection["files"] and collection["kernel_tests"] >= 1, collection
    assert "zstandard" in collection["hidden"]
    # only the files with GPU tests, never the whole suite
    assert tests["commands"][0].endswith(" ".join(collection["files"]))
    assert all(f.startswith("tests/") and f.endswith(".py") for f in collection["files"])


def test_dry_run_prints_the_plan_and_its_total(dry_run):
    out, proc = dry_run
    assert plan.format_plan(plan.DEFAULT_BUDGET_S) in proc.stderr
    report = json.loads((out / "gpu-report.json").read_text())
    assert report["planned_total_s"] == plan.planned_total()
    assert [p["step"] for p in report["plan"]] == plan.STEP_NAMES
    assert f"planned on a bare H100 machine: {plan.planned_total()} s" in (out / "gpu-report.md").read_text()


def test_dry_run_report_lists_the_targets(dry_run):
    out, _ = dry_run
    report = json.loads((out / "gpu-report.json").read_text())
    targets = " ".join(t["target"] for t in report["targets"])
    for wanted in (">= 0.9x", ">= 45%", ">= 1.5x", "each step within"):
        assert wanted in targets
    md = (out / "gpu-report.md").read_text()
    assert "## Targets" in md and "(dry run)" in md
    for name in plan.STEP_NAMES:
        assert f"## {name}:" in md and f"| {name} | skipped |" in md
    assert (out / "gpu-check.log").is_file()


def test_a_step_that_cannot_import_glm_fails_the_dry_run(tmp_path, bare_python):
    """The probe itself can fail: a command started from a directory where glm is not on the path
    (a script outside the tree, with no PYTHONPATH) is reported, not passed."""
    args = type("A", (), {"dry_run": True, "out": str(tmp_path), "python": bare_python, "budget": 60.0,
                          "ext_dir": str(tmp_path / "ext"), "cpu_smoke": False})()
    c = gpu_check.Check(args, gpu=False)
    c.log_path.write_text("")
    c.env = {k: v for k, v in c.env.items() if k != "PYTHONPATH"}
    stray = tmp_path / "elsewhere" / "tool.py"
    stray.parent.mkdir()
    r = gpu_check.StepResult("decode", "decode")
    c.add_command(r, [bare_python, str(stray)])
    gpu_check.check_step_imports(c, r, {})
    assert r.cpu_smoke["imports"]["status"] == "failed"
    assert "glm_cli.core" in r.cpu_smoke["imports"]["failed"][0]["wrong"]
    assert gpu_check.cpu_checks_failed(r) == ["imports"]


def test_import_origin_follows_each_way_of_starting():
    py = sys.executable
    assert gpu_check.import_origin([py, "-m", "glm_cli", "pretrain"]) == ("module", "glm_cli")
    assert gpu_check.import_origin([py, "-m", "pytest", "-m", "gpu"]) == ("module", "pytest")
    assert gpu_check.import_origin([py, str(ROOT / "bench" / "attention.py"), "--seqs", "1"]) == (
        "script", str(ROOT / "bench"))
    launcher = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    assert gpu_check.import_origin([*launcher, "-m", "glm_cli", "pretrain"]) == ("module", "glm_cli")
    assert gpu_check.import_origin([*launcher, str(gpu_check.PROBES), "nccl"]) == ("script", str(ROOT / "bench"))


def test_gpu_test_files_are_found_at_any_depth(tmp_path):
    (tmp_path / "tests" / "model").mkdir(parents=True)
    (tmp_path / "tests" / "model" / "test_k.py").write_text("import pytest\n@pytest.mark.gpu\ndef test_a(): pass\n")
    (tmp_path / "tests" / "test_top.py").write_text("@pytest.mark.gpu\ndef test_b(): pass\n")
    (tmp_path / "tests" / "test_cpu.py").write_text("# pytest.mark.gpus is another marker\ndef test_c(): pass\n")
    (tmp_path / "tests" / "model" / "helper_gpu.py").write_text("@pytest.mark.gpu\n")
    assert plan.gpu_test_files(tmp_path) == ["tests/model/test_k.py", "tests/test_top.py"]
    assert plan.KERNEL_TESTS in plan.gpu_test_files(ROOT)


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


# ----------------------------------------------------------------------------------- the plan


def test_plan_runs_the_most_informative_steps_first_and_fits_with_room():
    assert plan.STEP_NAMES == ["env", "kernel", "tests", "decode", "pretrain", "torchrun"]
    total = plan.planned_total()
    assert total < 9 * 60 and total <= plan.DEFAULT_BUDGET_S - 45, total  # the bound, and room left
    for step in plan.STEPS:
        assert 0 < step.planned_s < step.limit_s and step.estimate
    text = plan.format_plan(plan.DEFAULT_BUDGET_S)
    assert f"{total / 60:.1f} min" in text and "kernel build included" in text
    assert plan.planned_total(["env", "kernel"]) == 150


# ------------------------------------------------------------------------------ env verdict


def test_a_kernel_that_does_not_build_fails_the_env_step_with_the_compilers_last_lines():
    compiler = "\n".join([f"[{i}/3] nvcc ... flash_attn.cu" for i in range(1, 60)] + [
        "flash_attn.cu(212): error: identifier \"kBlockN\" is undefined", "1 error detected",
        "ninja: build stopped: subcommand failed."])
    failure = probes.build_failure(RuntimeError(f"Error building extension 'glm_flash_attn': {compiler}"))
    assert "Error building extension" in failure["reason"] and "kBlockN" in failure["reason"]
    assert failure["tail"].endswith("ninja: build stopped: subcommand failed.")
    assert "kBlockN" in failure["tail"] and len(failure["tail"].splitlines()) == 40
    status, reason, tail = gpu_check.env_verdict({"build": {"status": "failed", **failure}}, probe_ok=True)
    assert status == "failed" and "did not build" in reason and tail == failure["tail"]
    # a probe killed mid-build, a CPU-only torch on a GPU machine: failed too, never "ok"
    assert gpu_check.env_verdict({}, probe_ok=False, timed_out=True)[:2] == (
        "failed", "the fused kernel did not build: timed out")
    assert gpu_check.env_verdict({"build": {"status": "skipped", "reason": "CPU-only torch"}}, True)[0] == "failed"
    assert gpu_check.env_verdict({"build": {"status": "ok", "prebuilt_used": True}}, True)[:2] == (
        "ok", "prebuilt kernel loaded")


# ----------------------------------------------------------------------------- kernel step


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_baseline_expands_kv_to_the_same_gqa_attention(causal):
    """cuDNN's SDPA backend takes no enable_gqa: the check expands K/V instead. On the CPU the math
    backend shows the expansion is the same attention, forward and gradients (which sum back)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 33, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 33, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    F = torch.nn.functional
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    got = F.scaled_dot_product_attention(q, probes.expand_kv(k, 4), probes.expand_kv(v, 4),
                                         is_causal=causal)
    torch.testing.assert_close(got, want)
    do = torch.randn_like(want)
    grads_want = torch.autograd.grad(want, (q, k, v), do)
    grads_got = torch.autograd.grad(got, (q, k, v), do)
    for a, b in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(a, b)
    # and not the interleaved mapping (query head h -> K/V head h % Hkv), which differs
    wrong = F.scaled_dot_product_attention(q, k.repeat(1, 4, 1, 1), v.repeat(1, 4, 1, 1), is_causal=causal)
    assert (wrong - want).abs().max() > 1e-3


def test_published_bars_are_shown_for_the_long_causal_hd128_rows():
    rows = [{"head_dim": 128, "causal": True, "seq": s, "glm_fwd_tflops": 300.0, "sdpa_fwd_tflops": 330.0}
            for s in (1024, 4096, 8192)] + [{"head_dim": 64, "causal": True, "seq": 4096, "glm_fwd_tflops": 1.0}]
    figures = gpu_check.published_bar_figures(rows, [{"seq": 4096, "fwd_tflops": 500.0}])
    assert [f.name for f in figures] == ["fwd hd128 T4096 causal vs published H100",
                                         "fwd hd128 T8192 causal vs published H100"]
    assert "50% of FlashAttention-3 (580-620)" in figures[0].value  # 300 / 600
    assert "92% of FlashAttention-2" in figures[0].value and "cuDNN 500" in figures[0].value


# ---------------------------------------------------------------------------- loss comparison


def _curve(steps=30, start=10.4, end=3.0, rate=0.15):
    import math

    return [end + (start - end) * math.exp(-rate * i) for i in range(steps)]


def _noisy(curve, seed, scale):
    """bf16-sized disagreement: a few roundings at step 1, growing as the runs' updates diverge, sign free."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(len(curve), generator=g, dtype=torch.float64)
    drift = torch.cumsum(torch.randn(len(curve), generator=g, dtype=torch.float64), 0) / len(curve) ** 0.5
    return [x * (1 + scale * (e + d)) for x, e, d in zip(curve, eps.tolist(), drift.tolist(), strict=True)]


def test_loss_comparison_passes_bf16_sized_noise():
    base = _curve()
    assert plan.compare_losses(base, base)["ok"]
    for seed in range(200):  # disagreement of ~2 bf16 roundings per step, a random walk on top
        v = plan.compare_losses(_noisy(base, seed, 2 * plan.BF16_U / 2), base)
        assert v["ok"], (seed, v)


def test_loss_comparison_fails_a_real_difference():
    base = _curve()
    # a backend whose model learns more slowly (wrong scale, wrong K/V head): the curve stays above
    slower = _curve(rate=0.12)
    v = plan.compare_losses(slower, base)
    assert not v["ok"] and "apart" in v["reason"], v
    # a leak of the next token: the curve falls faster
    assert not plan.compare_losses(_curve(rate=0.2), base)["ok"]
    # a constant 1% offset is inside every step's band but not the mean's
    v = plan.compare_losses([x * 1.01 for x in base], base)
    assert not v["ok"] and "mean" in v["reason"] and "step" not in v["reason"].split("mean")[0], v
    # a single step far off (a NaN-ish spike) fails on its own
    spiky = list(base)
    spiky[7] *= 1.2
    v = plan.compare_losses(spiky, base)
    assert not v["ok"] and v["worst_step"] == 8


def test_loss_comparison_looks_only_at_the_early_window_and_needs_steps():
    base = _curve(steps=60)
    late = base[:plan.LOSS_WINDOW] + [x * 1.2 for x in base[plan.LOSS_WINDOW:]]
    assert plan.compare_losses(late, base)["ok"]  # past the window the runs may drift apart
    v = plan.compare_losses(base[:3], base[:3])
    assert not v["ok"] and "only 3 steps" in v["reason"]


def test_synthetic_shards_hold_a_learnable_phrase_and_a_block_only_attention_predicts():
    import numpy as np

    rng = np.random.default_rng(0)
    phrases = rng.integers(1, 1000, size=(8, 64))
    toks = probes.synthetic_tokens(rng, 1000, 1000, phrases)
    assert len(toks) == 1000 and toks.min() >= 1 and toks.max() < 1000
    units = toks[:896].reshape(7, 128)
    for unit in units:
        assert any((unit[:64] == p).all() for p in phrases)  # a pool phrase
        assert (unit[80:] == unit[64:112]).all()  # each token of the copies is the one 16 back
        assert not any((unit[64:80] == p[:16]).all() for p in phrases)  # the block is fresh
    assert len({tuple(u[64:80]) for u in units}) == 7
