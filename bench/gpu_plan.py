"""The plan of `make gpu-check`, apart from the runner (bench/gpu_check.py): which steps, in what order,
how long each should take on a bare H100 machine, which test files the tests step runs, and the
loss comparison between the two attention backends.

Nothing here starts a process or touches a GPU, so all of it is unit-tested on a CPU
(tests/cli/test_gpu_check.py). The reasoning behind every planned time is in docs/cuda_ext.md, "The
budget".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StepPlan:
    name: str
    title: str
    planned_s: int
    """Expected seconds on a bare H100 machine (nothing prebuilt): what the dry run adds up."""
    limit_s: int
    """The most this step may take before it is cut off (also cut to what is left of --budget)."""
    estimate: str
    """What the planned time is made of, in one line (printed by the dry run)."""


# Most informative first: a kernel that does not build or is wrong makes everything after it moot,
# and the GPU tests and decode are cheaper than pretraining, which is cheaper per finding than torchrun.
STEPS: tuple[StepPlan, ...] = (
    StepPlan("env", "environment and kernel build", 90, 240,
             "python + torch + CUDA init ~10 s; binding.cpp and flash_attn.cu (sm_90 only) built in parallel "
             "by ninja ~60-80 s; a carried prebuilt .so: ~10 s in all"),
    StepPlan("kernel", "fused kernel vs SDPA (flash, cuDNN), fp32 and the published bars", 60, 150,
             "accuracy: 8 shapes x 3 backends vs fp32 ~20 s; bench/attention.py: 12 shapes, 13 calls each "
             "~30 s; two process starts ~10 s"),
    StepPlan("tests", "pytest -m gpu on the files that hold GPU tests", 40, 120,
             "pytest start + collection ~10 s; the GPU tests load the kernel built in env ~30 s"),
    StepPlan("decode", "decode the 124m preset, batch 1 and 16, vs transformers", 50, 120,
             "start + transformers import ~15 s; 2 batch sizes x 2 engines x 3 repeats x 128 tokens ~35 s"),
    StepPlan("pretrain", "glm pretrain 124m bf16: fused vs sdpa from one seed, then the compiled pair", 150, 300,
             "shards ~5 s; 2 eager runs of 30 steps ~20 s each (start ~12 s); 2 compiled runs ~50 s each "
             "(inductor's cold compile of the 124m step ~35 s), run only when torch.compile works"),
    StepPlan("torchrun", "torchrun --nproc_per_node=1: NCCL, DDP and FSDP2, checkpoint resumed", 60, 150,
             "an NCCL probe and 4 one-process launches (2 steps, then --resume to 3) ~12 s each"),
)
STEP_NAMES = [s.name for s in STEPS]
BY_NAME = {s.name: s for s in STEPS}

# The device tool gives one command at most 600 s and the machine's start is not in it; 510 s leaves
# a minute and a half for the report, the transfer back and a step that runs long.
DEFAULT_BUDGET_S = 510


def planned_total(names: list[str] | None = None) -> int:
    return sum(s.planned_s for s in STEPS if names is None or s.name in names)


def format_plan(budget_s: float, names: list[str] | None = None) -> str:
    """The plan as the dry run prints it: one line a step, then the planned total against the budget."""
    lines = [f"{'step':9s} {'planned':>7s} {'limit':>6s}  estimate"]
    for s in STEPS:
        if names is None or s.name in names:
            lines.append(f"{s.name:9s} {s.planned_s:6d}s {s.limit_s:5d}s  {s.estimate}")
    total = planned_total(names)
    lines.append(f"{'total':9s} {total:6d}s         of a {budget_s:.0f} s budget "
                 f"({total / 60:.1f} min planned on a bare H100 machine, kernel build included)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ kernel step

ATTN_SEQS, ATTN_HEAD_DIMS, ATTN_GQA = "1024,4096,8192", "64,128", 4  # bench/attention.py's shapes, GQA 4:1
ERROR_RATIO = 2.0
"""The kernel's max error may be this many times SDPA-flash's (plus a bf16 floor)."""


# ------------------------------------------------------------------------------------- GPU tests

# A test file joins the tests step when it marks a test for the GPU; the step then selects `-m gpu`.
# Only these files are collected: the rest of the suite imports packages a bare GPU machine may not
# have (zstandard, pyarrow, transformers, ...), and collecting it there fails.
GPU_MARK = re.compile(r"\bpytest\.mark\.gpu\b")
KERNEL_TESTS = "tests/model/test_cuda_ext.py"

# Packages the GPU test files must collect without (the dry run hides them while it collects).
OPTIONAL_PACKAGES = ("zstandard", "pyarrow", "transformers", "matplotlib", "py3langid", "lm_eval")


def gpu_test_files(root: Path) -> list[str]:
    """The test files (relative to root, sorted) that hold a `pytest.mark.gpu` test, at any depth."""
    tests = Path(root) / "tests"
    return sorted(str(f.relative_to(root)) for f in tests.rglob("test_*.py")
                  if GPU_MARK.search(f.read_text(encoding="utf-8", errors="replace")))


# ------------------------------------------------------------------------------- loss comparison

# bf16 keeps 8 significant bits: its unit roundoff (half an ulp at 1.0) is 2^-8 ~ 0.39%.
BF16_U = 2.0 ** -8
LOSS_WINDOW = 20
"""Steps compared: the early ones, before the two runs' rounding differences have compounded."""
LOSS_STEP_BAND = 8 * BF16_U
"""Any one step's losses may differ by this much, relative (~3.1%)."""
LOSS_MEAN_BAND = 2 * BF16_U
"""The mean signed relative difference over the window may be this far from 0 (~0.78%)."""


def compare_losses(a: list[float], b: list[float], window: int = LOSS_WINDOW,
                   step_band: float = LOSS_STEP_BAND, mean_band: float = LOSS_MEAN_BAND) -> dict:
    """Compare two loss curves from the same seed and data (a: the backend under test, b: the
    reference), step by step over the first `window` steps.

    Both runs start from the same weights and see the same batches, so they differ only where the
    attention backends round differently (bf16 outputs, each within 2^-8 relative of the exact
    value). The difference starts far below one bf16 rounding and grows slowly as the updates
    diverge; it has no preferred sign. A real difference in training (a backend that diverges, learns
    faster or slower, spikes) moves one curve away from the other and keeps it there. So: every step
    within `step_band` (8 bf16 roundings, ~3.1%) and the mean signed difference within `mean_band`
    (2 roundings, ~0.78%). Measured on a CPU (bench/loss_band.py), two correct backends stay within
    0.1% over 20 steps, a wrong K/V head mapping and a next-token leak leave the band (3.6%, 5.7%),
    a wrong softmax scale does not (0.7%): the kernel's own errors are checked against fp32 in the
    kernel step (docs/cuda_ext.md, "Comparing the backends' losses")."""
    n = min(window, len(a), len(b))
    if n < min(window, 5):
        return {"ok": False, "steps": n, "reason": f"only {n} steps to compare (need {min(window, 5)})",
                "max_rel": float("nan"), "mean_rel": float("nan"), "worst_step": None,
                "band": step_band, "mean_band": mean_band}
    rel = [(x - y) / abs(y) for x, y in zip(a[:n], b[:n], strict=True)]
    worst = max(range(n), key=lambda i: abs(rel[i]))
    mean_rel = sum(rel) / n
    reasons = []
    if abs(rel[worst]) > step_band:
        reasons.append(f"step {worst + 1}: {100 * rel[worst]:+.2f}% apart (band {100 * step_band:.2f}%)")
    if abs(mean_rel) > mean_band:
        reasons.append(f"mean over steps 1-{n}: {100 * mean_rel:+.2f}% (band {100 * mean_band:.2f}%)")
    return {"ok": not reasons, "steps": n, "max_rel": abs(rel[worst]), "worst_step": worst + 1,
            "mean_rel": mean_rel, "band": step_band, "mean_band": mean_band, "reason": "; ".join(reasons)}
