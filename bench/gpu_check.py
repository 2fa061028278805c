"""One GPU check: everything that makes glm a GPU toolchain, in one time-boxed command and one report.

    python bench/gpu_check.py gpu-report                 # on a GPU machine (or: make gpu-check OUT=gpu-report)
    python bench/gpu_check.py gpu-report --dry-run       # anywhere: walk every step, run nothing on a GPU

Steps, in this order, each in its own subprocess with a timeout; a failure is recorded (with the last
lines of its output) and the next step runs:

  1. env       GPU, torch, CUDA, nvcc, missing packages; the fused kernel built (timed) or a prebuilt one
  2. tests     `pytest -m gpu` and its summary line
  3. kernel    the kernel against SDPA (flash, cuDNN) and fp32: max errors of O, LSE, dQ, dK, dV; TFLOP/s
               from bench/attention.py at head dims 64/128, lengths 1k/4k/8k, causal and not, bf16, GQA 4:1
  4. pretrain  `glm pretrain --preset 124m`, ~100 steps, bf16, GLM_ATTENTION fused and sdpa, with and
               without --compile: tokens/s, MFU, peak memory, final loss equal across backends
  5. torchrun  `torchrun --nproc_per_node=1` (NCCL) DDP and FSDP2, a few steps, then --resume; an NCCL probe
  6. decode    bench/generate.py on the 124m preset at batch 1 and 16 against transformers
  7. report    OUT/gpu-report.md and OUT/gpu-report.json, every figure beside its target

The whole run keeps within --budget seconds (default 510): each step's timeout is cut to what is left.
Without CUDA (or with --dry-run) every step is reported as skipped with the reason, after building its
command lines and checking them as far as a CPU allows: the environment probe runs for real, glm's
command lines are parsed by glm itself (`--help` appended: an unknown flag fails), bench/attention.py
must reach its no-CUDA exit; --cpu-smoke adds a 3-step `glm pretrain --preset tiny` parsed like the real
runs and its torchrun launch with --resume. So the script does not first fail on a GPU because of a
typo. tests/cli/test_gpu_check.py runs the dry run in CI.

The extension is built into --ext-dir (default build/cuda_ext, git-ignored); a successful build is
also copied into OUT, to be carried into build/cuda_ext next time so that step 1 skips the compile
(docs/cuda_ext.md, "One GPU check").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()

# Targets from the issue; each figure in the report is shown beside one of these.
TARGET_KERNEL_VS_SDPA = 0.9   # glm fwd+bwd TFLOP/s over SDPA-flash's, head dim 128, causal, 4k
TARGET_MFU = 0.45             # 124m preset, bf16, best backend
TARGET_DECODE_SPEEDUP = 1.5   # glm generate over transformers, each batch size
LOSS_RTOL = 0.02              # final loss of fused vs sdpa (and compiled vs eager), relative
ERROR_RATIO = 2.0             # the kernel's max error may be this many times SDPA-flash's, plus a floor

PRETRAIN_STEPS = 100
PRETRAIN_MICRO = 16
PRETRAIN_SEQ = 1024


# ------------------------------------------------------------------------------------------ steps

@dataclass
class Figure:
    name: str
    value: float | str | None
    target: str = ""
    met: bool | None = None
    unit: str = ""


@dataclass
class StepResult:
    name: str
    title: str
    status: str = "skipped"  # ok | failed | skipped
    reason: str = ""
    seconds: float = 0.0
    commands: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    error_tail: str = ""
    cpu_smoke: dict | None = None  # the tiny CPU version a dry run executed, if any

    def fail(self, reason: str, tail: str = "") -> StepResult:
        self.status, self.reason = "failed", reason
        self.error_tail = self.error_tail or tail
        return self


@dataclass
class Proc:
    rc: int | None  # None: not run (dry run) or killed at its timeout
    output: str
    seconds: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])


class Check:
    """Shared state of one run: where things go, the clock, how subprocesses are started."""

    def __init__(self, args, gpu: bool):
        self.args = args
        self.gpu = gpu
        self.dry = args.dry_run or not gpu
        self.skip_reason = ("--dry-run" if args.dry_run else "no CUDA device here") + ": not run"
        self.out = Path(args.out)
        self.work = Path(tempfile.mkdtemp(prefix="glm-gpu-check-"))
        self.python = args.python or sys.executable
        self.deadline = time.monotonic() + args.budget
        self.log_path = self.out / "gpu-check.log"
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["GLM_CUDA_EXT_DIR"] = str(Path(args.ext_dir).resolve())
        self.env.setdefault("GLM_ATTENTION", "auto")
        shim = importable_shim(self.python, self.work)
        if shim:
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), self.env.get("PYTHONPATH")]))
        self.smoke = args.cpu_smoke
        self.kernel_available: bool | None = None  # decided by step 1

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], timeout: float, env: dict | None = None, label: str = "",
            cwd: Path | None = None, force: bool = False) -> Proc:
        """Run cmd in its own process group, killed (whole group) at min(timeout, what is left of the
        budget); output appended to the log. In a dry run nothing runs unless `force` (CPU smoke)."""
        if self.dry and not force:
            return Proc(None, "", 0.0)
        limit = max(1.0, min(timeout, self.remaining()))
        start = time.monotonic()
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {label or 'command'}: {shell_line(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**self.env, **(env or {})}, cwd=cwd or ROOT, start_new_session=True)
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            with _suppress():
                os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            output += f"\n[gpu_check: killed after {limit:.0f} s]"
        seconds = time.monotonic() - start
        with open(self.log_path, "a") as log:
            log.write(output)
            log.write(f"\n===== exit {proc.returncode}{' (timed out)' if timed_out else ''}, {seconds:.1f} s\n")
        return Proc(None if timed_out else proc.returncode, output, seconds, timed_out)

    def validate(self, cmd: list[str], how: str) -> dict:
        """Dry run: check a planned command line without its GPU work. "help": a glm command with
        --help appended (click rejects an unknown option or a bad value before printing help);
        "no-cuda": a bench script that must get past its argument parsing to its no-CUDA exit (1)."""
        probe = [*cmd, "--help"] if how == "help" else cmd
        proc = self.run(probe, 120, label=f"validate ({how})", force=True)
        ok = proc.ok if how == "help" else (proc.rc == 1 and "no CUDA" in proc.output)
        return {"status": "ok" if ok else "failed", "command": shell_line(probe),
                **({} if ok else {"tail": proc.tail(8)})}

    def script(self, *args: str) -> list[str]:
        """This file's internal helpers, run by the same interpreter."""
        return [self.python, str(HERE), "_internal", *args]

    def glm(self, *args: str) -> list[str]:
        return [self.python, "-m", "glm_cli", *args]


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


def shell_line(cmd: list[str], env: dict | None = None) -> str:
    import shlex

    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    line = " ".join(shlex.quote(str(c)) for c in cmd).replace(str(ROOT) + "/", "")
    return f"{prefix} {line}".strip()


def importable_shim(python: str, work: Path) -> Path | None:
    """A PYTHONPATH entry under which `glm_cli`, `glm_cli.core`, ... import from this tree, for an
    interpreter where glm is not installed (a lent GPU machine runs its own python3 and torch; nothing
    is installed there). None when `glm_cli.core` already imports from this tree."""
    probe = ("import importlib.util as u, sys; s = u.find_spec('glm_cli.core'); "
             "sys.stdout.write(s.submodule_search_locations[0] if s else '')")
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        found = ""
    if found and Path(found).resolve() == (ROOT / "core").resolve():
        return None
    shim = work / "shim"
    pkg = shim / "glm_cli"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "__main__.py", "app.py"):
        (pkg / name).symlink_to(ROOT / "glm_cli" / name)
    for sub in ("core", "commands", "cuda_ext"):
        (pkg / sub).symlink_to(ROOT / sub, target_is_directory=True)
    return shim


def last_json(text: str):
    """The last JSON object printed in text (a summary after log lines), or None."""
    for match in reversed(list(re.finditer(r"^\{", text, re.M))):
        try:
            return json.JSONDecoder().raw_decode(text[match.start():])[0]
        except json.JSONDecodeError:
            continue
    return None


# ---------------------------------------------------------------------------------- 1. environment

def step_env(c: Check) -> StepResult:
    r = StepResult("env", "environment and kernel build")
    out_json = c.work / "env.json"
    cmd = c.script("env", str(out_json), str(c.out))
    r.commands.append(shell_line(cmd))
    proc = c.run(cmd, 300, label="env", force=True)  # cheap on a CPU too: the probe is the smoke test
    info = _read_json(out_json)
    if info is None:
        c.kernel_available = False
        return r.fail("the environment probe did not finish", proc.tail())
    r.details = info
    r.figures += [Figure("GPU", info.get("gpu") or "none"), Figure("torch", info.get("torch")),
                  Figure("CUDA (torch)", info.get("cuda") or "none"), Figure("nvcc", info.get("nvcc") or "none")]
    if info.get("missing"):
        r.figures.append(Figure("missing packages", ", ".join(info["missing"]),
                                "none (carry wheels: .library device README)", False))
    b = info.get("build", {})
    c.kernel_available = b.get("status") == "ok"
    r.figures.append(Figure("kernel build", b.get("status"), "ok", c.kernel_available if c.gpu else None))
    if b.get("seconds") is not None:
        r.figures.append(Figure("build time", round(b["seconds"], 1), "prebuilt: ~0", unit="s"))
    if c.dry:
        r.cpu_smoke = {"status": "ok" if proc.ok else "failed", "seconds": round(proc.seconds, 1)}
        r.reason = f"{c.skip_reason} on a GPU (the probe itself ran: {b.get('status')}, {b.get('reason', '')})"
        return r
    r.status = "ok" if proc.ok else "failed"
    if not proc.ok:
        r.reason, r.error_tail = "the probe exited with an error", proc.tail()
    elif not c.kernel_available:
        r.reason = f"kernel: {b.get('reason', 'not built')}; steps that need it fall back or skip"
    return r


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def internal_env(out_json: str, export_dir: str) -> int:
    """Probe versions and build (or load a prebuilt) fused-attention extension; writes JSON."""
    import platform

    info: dict = {"python": platform.python_version(), "missing": []}
    for mod in ("torch", "typer", "rich", "tokenizers", "safetensors", "numpy", "matplotlib", "zstandard",
                "py3langid", "transformers", "pytest"):
        if importlib.util.find_spec(mod) is None:
            info["missing"].append(mod)
    import torch

    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                gpu=None, capability=None, gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    from glm_cli.cuda_ext import build

    nvcc = build.find_nvcc()
    if nvcc:
        with _suppress_all():
            text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
            info["nvcc"] = (re.findall(r"release ([\d.]+)", text) or [None])[0]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = "{}.{}".format(*torch.cuda.get_device_capability())
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        from glm_cli.core.train.metrics import peak_flops

        info["peak_bf16_tflops"] = peak_flops(torch.device("cuda"), torch.bfloat16)[0] / 1e12
    Path(out_json).write_text(json.dumps(info, indent=1))  # in case the build below never returns
    if torch.version.cuda is None or not torch.cuda.is_available():
        reason = "CPU-only torch" if torch.version.cuda is None else "no CUDA device"
        info["build"] = {"status": "skipped", "reason": reason}
    else:
        prebuilt = build.prebuilt_path()
        had_prebuilt = prebuilt.is_file()
        start = time.monotonic()
        try:
            module = build.build(verbose=False)
            info["build"] = {"status": "ok", "seconds": time.monotonic() - start, "prebuilt_used": had_prebuilt,
                             "module": getattr(module, "__file__", None)}
            if prebuilt.is_file():
                shutil.copy2(prebuilt, Path(export_dir) / prebuilt.name)
                info["build"]["exported"] = prebuilt.name
        except Exception as exc:  # the compiler's output is in the message: keep its end
            info["build"] = {"status": "failed", "seconds": time.monotonic() - start,
                             "reason": str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc)}
            print(str(exc)[-4000:], file=sys.stderr)
    Path(out_json).write_text(json.dumps(info, indent=1))
    return 0


class _suppress_all:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


# ---------------------------------------------------------------------------------------- 2. tests

def step_tests(c: Check) -> StepResult:
    r = StepResult("tests", "pytest -m gpu")
    # only the files that hold GPU tests: the others may import packages a GPU machine lacks (zstandard)
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())
    cmd = [c.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", "addopts=", *files]
    r.commands.append(shell_line(cmd))
    if c.dry:
        r.reason = c.skip_reason
        return r
    proc = c.run(cmd, 180, label="pytest -m gpu")
    summary = pytest_summary(proc.output)
    r.figures.append(Figure("summary", summary or "(none)", "no failures", proc.ok))
    r.status = "ok" if proc.ok else "failed"
    if not proc.ok:
        r.reason = "timed out" if proc.timed_out else "GPU tests failed"
        r.error_tail = failing_lines(proc.output) or proc.tail()
    return r


def pytest_summary(output: str) -> str:
    for line in reversed(output.splitlines()):
        if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line):
            return line.strip("= ").strip()
    return ""


def failing_lines(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return "\n".join(lines[:30])


# ------------------------------------------------------------------------------------ 3. kernel

ATTN_SEQS, ATTN_HEAD_DIMS, ATTN_GQA = "1024,4096,8192", "64,128", 4


def step_kernel(c: Check) -> StepResult:
    r = StepResult("kernel", "fused kernel vs SDPA (flash, cuDNN) and fp32")
    acc_json, bench_json = c.work / "kernel_accuracy.json", c.work / "attention.json"
    acc_cmd = c.script("kernel-accuracy", str(acc_json))
    bench_cmd = [c.python, str(ROOT / "bench" / "attention.py"), "--seqs", ATTN_SEQS, "--head-dims",
                 ATTN_HEAD_DIMS, "--causal", "both", "--dtype", "bf16", "--gqa", str(ATTN_GQA),
                 "--warmup", "3", "--iters", "10", "--json", str(bench_json)]
    r.commands += [shell_line(acc_cmd), shell_line(bench_cmd)]
    if c.dry:
        r.reason = c.skip_reason
        r.cpu_smoke = {"bench/attention.py arguments": c.validate(bench_cmd, "no-cuda")}
        return r
    if not c.kernel_available:
        r.reason = "the fused extension is not available (step env)"
        return r
    acc = c.run(acc_cmd, 120, label="kernel accuracy")
    bench = c.run(bench_cmd, 150, label="bench/attention.py")
    problems = []
    data = _read_json(acc_json)
    if data is None:
        problems.append("accuracy check did not finish")
        r.error_tail += acc.tail()
    else:
        r.details["accuracy"] = data
        for case in data.get("cases", []):
            label = f"err hd{case['head_dim']} T{case['seq']} {'causal' if case['causal'] else 'full'}"
            ok = case.get("within_target")
            r.figures.append(Figure(label, case.get("summary"), f"glm <= {ERROR_RATIO:g}x SDPA-flash + floor", ok))
            if ok is False:
                problems.append(f"{label} over target")
        for row in data.get("cudnn", []):
            r.figures.append(Figure(f"cuDNN f+b hd{row['head_dim']} T{row['seq']} causal", row.get("fwdbwd_tflops"),
                                    unit="TFLOP/s"))
    rows = (_read_json(bench_json) or {}).get("rows")
    if rows is None:
        problems.append("bench/attention.py wrote no table")
        r.error_tail += "\n" + bench.tail()
    else:
        r.details["attention_rows"] = rows
        for row in rows:
            g, s = row.get("glm_fwdbwd_tflops"), row.get("sdpa_fwdbwd_tflops")
            key = row["head_dim"] == 128 and row["causal"] and row["seq"] == 4096
            ratio = g / s if g and s else None
            r.figures.append(Figure(
                f"f+b hd{row['head_dim']} T{row['seq']} {'causal' if row['causal'] else 'full'} glm/sdpa",
                _fmt_ratio(g, s, row.get("glm_fwd_tflops"), row.get("sdpa_fwd_tflops")),
                f">= {TARGET_KERNEL_VS_SDPA}x" if key else "",
                (ratio is not None and ratio >= TARGET_KERNEL_VS_SDPA) if key else None))
            if key:
                r.details["target_ratio"] = ratio
    r.status = "failed" if problems or not acc.ok or not bench.ok else "ok"
    r.reason = "; ".join(problems)
    return r


def _fmt_ratio(g, s, gf, sf) -> str:
    if not (g and s):
        return "n/a"
    return f"{g / s:.2f}x (f+b {g:.0f} vs {s:.0f}; fwd {gf or 0:.0f} vs {sf or 0:.0f} TFLOP/s)"


def internal_kernel_accuracy(out_json: str) -> int:
    """Max errors of glm's kernel, SDPA-flash and SDPA-cuDNN against fp32 math (O, LSE, dQ, dK, dV),
    bf16, GQA 4:1, head dims 64/128, causal and not; cuDNN fwd+bwd TFLOP/s where it runs."""
    import torch

    result: dict = {"cases": [], "cudnn": []}
    for head_dim in (64, 128):
        for causal in (True, False):
            for seq in (1024, 4096):
                result["cases"].append(_accuracy_case(head_dim, causal, seq))
                torch.cuda.empty_cache()
    # cuDNN timing at the target shape (bench/attention.py times the flash backend only)
    bench = _load_bench_attention()
    for seq in (1024, 4096, 8192):
        result["cudnn"].append(_cudnn_fwdbwd(bench, seq, 128))
    Path(out_json).write_text(json.dumps(result, indent=1))
    return 1 if any(case.get("within_target") is False for case in result["cases"]) else 0


def _accuracy_case(head_dim: int, causal: bool, seq: int) -> dict:
    import math

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from glm_cli.cuda_ext.flash import flash_attention, flash_attention_with_lse

    dev, dt = "cuda", torch.bfloat16
    heads = 2048 // head_dim
    g = torch.Generator(device=dev).manual_seed(seq + head_dim)
    q = torch.randn(1, heads, seq, head_dim, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, heads // ATTN_GQA, seq, head_dim, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, heads // ATTN_GQA, seq, head_dim, device=dev, dtype=dt, generator=g)
    do = torch.randn(1, heads, seq, head_dim, device=dev, dtype=dt, generator=g)
    # fp32 reference: O, LSE and the gradients
    qf, kf, vf = (x.float().requires_grad_(True) for x in (q, k, v))
    s = (qf @ kf.repeat_interleave(ATTN_GQA, 1).transpose(-1, -2)) / math.sqrt(head_dim)
    if causal:
        s = s.masked_fill(torch.ones(seq, seq, device=dev, dtype=torch.bool).triu(1), float("-inf"))
    ref = {"lse": torch.logsumexp(s.detach(), -1)}
    ref_o = torch.softmax(s, -1) @ vf.repeat_interleave(ATTN_GQA, 1)
    ref.update(zip(("dq", "dk", "dv"), torch.autograd.grad(ref_o, (qf, kf, vf), do.float()), strict=True))
    ref["o"] = ref_o.detach()
    del s, ref_o

    def errors(fn, lse=None) -> dict:
        qq, kk, vv = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        o = fn(qq, kk, vv)
        got = {"o": o.detach(), **dict(zip(("dq", "dk", "dv"), torch.autograd.grad(o, (qq, kk, vv), do),
                                           strict=True))}
        if lse is not None:
            got["lse"] = lse
        return {name: (got[name].float() - ref[name]).abs().max().item() for name in got}

    row = {"head_dim": head_dim, "seq": seq, "causal": causal}
    row["glm"] = errors(lambda a, b, c: flash_attention(a, b, c, causal=causal),
                        flash_attention_with_lse(q, k, v, causal=causal)[1])
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                row[name] = errors(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal,
                                                                                   enable_gqa=True))
        except RuntimeError as exc:  # a backend refusing the shape or missing from this build
            row[name] = {"error": str(exc).splitlines()[0][:160]}
    peer = row["sdpa_flash"] if "error" not in row["sdpa_flash"] else row["sdpa_cudnn"]
    row["summary"] = " ".join(f"{n} {row['glm'][n]:.2g}" for n in ("o", "lse", "dq", "dk", "dv"))
    if "error" not in peer:
        # floor: a few bf16 steps at the reference's typical magnitude
        floor = {n: 2 ** -6 * max(1.0, ref[n].abs().mean().item()) for n in ("o", "dq", "dk", "dv")}
        row["within_target"] = row["glm"]["lse"] <= 1e-2 and all(
            row["glm"][n] <= ERROR_RATIO * peer[n] + floor[n] for n in floor)
        row["summary"] += " (SDPA: " + " ".join(f"{n} {peer[n]:.2g}" for n in ("o", "dq", "dk", "dv")) + ")"
    return row


def _cudnn_fwdbwd(bench, seq: int, head_dim: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, batch = 2048 // head_dim, max(1, 16384 // seq)
    opts = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(batch, heads, seq, head_dim, **opts)
    k = torch.randn(batch, heads // ATTN_GQA, seq, head_dim, **opts)
    v = torch.randn(batch, heads // ATTN_GQA, seq, head_dim, **opts)
    do = torch.randn_like(q)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(do)

    row = {"seq": seq, "head_dim": head_dim, "fwdbwd_tflops": None}
    try:
        ms = bench._time_ms(fwd_bwd, 3, 10)
        row["fwdbwd_tflops"] = round(3.5 * 4.0 * batch * heads * seq * seq * head_dim / 2 / ms / 1e9, 1)
    except RuntimeError as exc:
        row["error"] = str(exc).splitlines()[0][:160]
    return row


def _load_bench_attention():
    """bench/attention.py as a module (bench/ is never put on sys.path: it holds names like tokenize.py)."""
    spec = importlib.util.spec_from_file_location("glm_bench_attention", ROOT / "bench" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------- 4. pretrain

def pretrain_cmd(c: Check, shards: Path, run_dir: Path, preset: str, steps: int, micro: int, seq: int,
                 compile_: bool, device: str = "cuda", dtype: str = "bf16", checkpoint_every: int = 0) -> list[str]:
    cmd = c.glm("pretrain", str(shards), "-o", str(run_dir), "--preset", preset, "--max-steps", str(steps),
                "-b", str(micro), "--batch-tokens", str(micro * seq), "--eval-every", "0",
                "--checkpoint-every", str(checkpoint_every), "--set", f"max_seq_len={seq}", "--set", "warmup_steps=10",
                "--device", device, "--dtype", dtype, "--seed", "0", "--json", "-q")
    return cmd + (["--compile"] if compile_ else [])


def read_run(run_dir: Path, skip: int) -> dict:
    """tokens/s over the steps after `skip` (compile and warm-up excluded), MFU from the engine's own
    FLOPs-per-token and peak (its per-window mfu / tokens_per_s), peak memory, loss at the end."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in recs if "step_time" in r]
    if not steps:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no training steps")
    timed = [r for r in steps if r["step"] > skip] or steps
    tokens_per_step = steps[-1]["tokens"] / steps[-1]["step"]  # a fresh run: tokens count from 0
    tps = tokens_per_step * len(timed) / sum(r["step_time"] for r in timed)
    per_token = next((r["mfu"] / r["tokens_per_s"] for r in steps if r.get("tokens_per_s")), 0.0)
    last = steps[-10:]
    return {"steps": steps[-1]["step"], "tokens_per_s": round(tps), "mfu": round(tps * per_token, 4),
            "peak_memory_gib": round(max(r.get("memory_mb", 0.0) for r in steps) / 1024, 2),
            "loss": round(sum(r["loss"] for r in last) / len(last), 4), "first_loss": round(steps[0]["loss"], 4)}


def step_pretrain(c: Check) -> StepResult:
    r = StepResult("pretrain", f"glm pretrain 124m, {PRETRAIN_STEPS} steps, bf16, fused/sdpa x eager/compile")
    shards = c.work / "shards"
    shard_cmd = c.script("shards", str(shards), "32768", str(6_000_000))
    r.commands.append(shell_line(shard_cmd))
    runs = []
    for attention in ("fused", "sdpa"):
        for compile_ in (False, True):
            name = f"{attention}{'+compile' if compile_ else ''}"
            cmd = pretrain_cmd(c, shards, c.work / "runs" / name, "124m", PRETRAIN_STEPS, PRETRAIN_MICRO,
                               PRETRAIN_SEQ, compile_)
            runs.append((name, attention, cmd))
            r.commands.append(shell_line(cmd, {"GLM_ATTENTION": attention}))
    if c.dry:
        r.reason = c.skip_reason
        r.cpu_smoke = {"glm pretrain arguments": c.validate(runs[-1][2], "help")}
        if c.smoke:
            r.cpu_smoke["tiny run"] = pretrain_smoke(c)
        return r
    made = c.run(shard_cmd, 120, label="synthetic shards")
    if not made.ok:
        return r.fail("could not write the synthetic shards", made.tail())
    results, problems = {}, []
    for name, attention, cmd in runs:
        if attention == "fused" and not c.kernel_available:
            r.details[name] = {"status": "skipped", "reason": "the fused extension is not available"}
            continue
        if c.remaining() < 30:
            r.details[name] = {"status": "skipped", "reason": "out of time"}
            problems.append(f"{name}: out of time")
            continue
        proc = c.run(cmd, 240 if "compile" in name else 150, env={"GLM_ATTENTION": attention}, label=name)
        if not proc.ok:
            r.details[name] = {"status": "failed", "tail": proc.tail(15)}
            problems.append(f"{name}: {'timed out' if proc.timed_out else 'failed'}")
            r.error_tail += f"--- {name}\n{proc.tail(15)}\n"
            continue
        try:
            stats = read_run(c.work / "runs" / name, skip=10 if "compile" in name else 3)
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        summary = last_json(proc.output) or {}
        stats["attention_backend"] = summary.get("attention_backend")
        stats["status"] = "ok"
        results[name] = r.details[name] = stats
        if stats["attention_backend"] != attention:
            problems.append(f"{name}: ran with attention backend {stats['attention_backend']!r}")
        r.figures += [Figure(f"{name} tokens/s", stats["tokens_per_s"]),
                      Figure(f"{name} MFU", f"{100 * stats['mfu']:.1f}%", f">= {100 * TARGET_MFU:.0f}%",
                             stats["mfu"] >= TARGET_MFU),
                      Figure(f"{name} peak memory", stats["peak_memory_gib"], unit="GiB"),
                      Figure(f"{name} loss @{stats['steps']}", stats["loss"])]
    base = results.get("sdpa")
    for name, stats in results.items():
        if base and name != "sdpa":
            rel = abs(stats["loss"] - base["loss"]) / base["loss"]
            ok = rel <= LOSS_RTOL
            r.figures.append(Figure(f"loss {name} vs sdpa", f"{100 * rel:.2f}% apart", f"<= {100 * LOSS_RTOL:g}%", ok))
            if not ok:
                problems.append(f"loss {name} vs sdpa {100 * rel:.1f}% apart")
    if results:
        best = max(results.values(), key=lambda s: s["mfu"])
        r.details["best_mfu"] = best["mfu"]
    r.status = "failed" if problems or not results else "ok"
    r.reason = "; ".join(problems)
    return r


def pretrain_smoke(c: Check) -> dict:
    """The same command builder and parser on a 3-step CPU run of the tiny preset."""
    shards, run_dir = c.work / "smoke-shards", c.work / "smoke-run"
    made = c.run(c.script("shards", str(shards), "512", "20000"), 120, label="smoke shards", force=True)
    if not made.ok:
        return {"status": "failed", "tail": made.tail()}
    cmd = pretrain_cmd(c, shards, run_dir, "tiny", 3, 2, 64, False, device="cpu", dtype="fp32")
    proc = c.run(cmd, 120, env={"GLM_ATTENTION": "sdpa"}, label="smoke pretrain", force=True)
    if not proc.ok:
        return {"status": "failed", "command": shell_line(cmd), "tail": proc.tail()}
    try:
        stats = read_run(run_dir, skip=1)
    except (OSError, ValueError, KeyError) as exc:
        return {"status": "failed", "reason": str(exc)}
    stats["attention_backend"] = (last_json(proc.output) or {}).get("attention_backend")
    return {"status": "ok", "command": shell_line(cmd, {"GLM_ATTENTION": "sdpa"}), **stats}


def internal_shards(directory: str, vocab: str, tokens: str) -> int:
    """Token shards a model can learn from: random 64-token phrases from a pool of 512, repeated in
    random order (the loss falls well below ln(vocab) within a hundred steps). No tokenizer."""
    import numpy as np

    from glm_cli.core.io.shards import ShardIndex, write_shard

    vocab_n, n = int(vocab), int(tokens)
    rng = np.random.default_rng(0)
    directory_p = Path(directory)
    directory_p.mkdir(parents=True, exist_ok=True)
    index = ShardIndex(dtype="<u2" if vocab_n <= 65536 else "<u4", vocab_size=vocab_n, eot_token_id=0,
                       tokenizer_sha256="gpu-check")
    phrases = rng.integers(1, vocab_n, size=(512, 64))
    toks = phrases[rng.integers(0, 512, size=n // 64 + 1)].ravel()[:n].astype(index.dtype)
    val = phrases[rng.integers(0, 512, size=64)].ravel().astype(index.dtype)
    index.shards.append(write_shard(directory_p, "train-000000", "train", toks, np.array([0]), n * 3))
    index.shards.append(write_shard(directory_p, "val-000000", "val", val, np.array([0]), len(val) * 3))
    index.save(directory_p)
    return 0


# ---------------------------------------------------------------------------------- 5. torchrun

def step_torchrun(c: Check) -> StepResult:
    r = StepResult("torchrun", "torchrun --nproc_per_node=1: NCCL, DDP and FSDP2, checkpoint resumed")
    shards = c.work / "shards"
    if not (shards / "index.json").is_file():
        r.commands.append(shell_line(c.script("shards", str(shards), "32768", str(6_000_000))))
    launcher = [c.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    probe = [*launcher, str(HERE), "_internal", "nccl", str(c.work / "nccl.json")]
    plans = [("nccl probe", probe, None)]
    for mode in ("ddp", "fsdp"):
        run_dir = c.work / "runs" / f"torchrun-{mode}"
        glm_args = pretrain_cmd(c, shards, run_dir, "124m", 4, 8, PRETRAIN_SEQ, False, checkpoint_every=2)[3:]
        base = [*launcher, "-m", "glm_cli", *glm_args] + (["--fsdp"] if mode == "fsdp" else [])
        resume = [*base, "--resume"]
        resume[resume.index("--max-steps") + 1] = "6"
        plans += [(f"{mode} 4 steps", base, None), (f"{mode} resumed to 6", resume, 6)]
    r.commands += [shell_line(p[1]) for p in plans]
    if c.dry:
        r.reason = c.skip_reason
        fsdp_resume = plans[-1][1]
        glm_part = [c.python, *fsdp_resume[fsdp_resume.index("-m", len(launcher)):]]
        r.cpu_smoke = {"glm pretrain arguments": c.validate(glm_part, "help")}
        if c.smoke:
            r.cpu_smoke["tiny run"] = torchrun_smoke(c, launcher)
        return r
    if not (shards / "index.json").is_file():
        made = c.run(c.script("shards", str(shards), "32768", str(6_000_000)), 120, label="shards")
        if not made.ok:
            return r.fail("could not write the synthetic shards", made.tail())
    problems = []
    for label, cmd, want_step in plans:
        proc = c.run(cmd, 120, label=label)
        ok = proc.ok
        note = "ok"
        if ok and want_step is not None:
            summary = last_json(proc.output) or {}
            ok = summary.get("step") == want_step and summary.get("status") == "completed"
            note = f"step {summary.get('step')}, {summary.get('status')}"
        if label == "nccl probe" and ok:
            note = json.dumps(_read_json(c.work / "nccl.json"))
        r.figures.append(Figure(label, note if ok else ("timed out" if proc.timed_out else "failed"), "ok", ok))
        if not ok:
            problems.append(label)
            r.error_tail += f"--- {label}\n{proc.tail(12)}\n"
    r.status = "failed" if problems else "ok"
    r.reason = "; ".join(problems)
    return r


def torchrun_smoke(c: Check, launcher: list[str]) -> dict:
    """torchrun (one process, CPU: no process group at world size 1) on the tiny preset, then --resume."""
    shards, run_dir = c.work / "smoke-shards", c.work / "smoke-torchrun"
    if not (shards / "index.json").is_file():
        c.run(c.script("shards", str(shards), "512", "20000"), 120, label="smoke shards", force=True)
    base = [*launcher, "-m", "glm_cli",
            *pretrain_cmd(c, shards, run_dir, "tiny", 2, 2, 64, False, "cpu", "fp32", checkpoint_every=1)[3:]]
    resume = [*base, "--resume"]
    resume[resume.index("--max-steps") + 1] = "3"
    for label, cmd in (("smoke torchrun", base), ("smoke torchrun --resume", resume)):
        proc = c.run(cmd, 180, env={"GLM_ATTENTION": "sdpa"}, label=label, force=True)
        if not proc.ok:
            return {"status": "failed", "step": label, "tail": proc.tail()}
    summary = last_json(proc.output) or {}
    ok = summary.get("step") == 3 and summary.get("status") == "completed"
    return {"status": "ok" if ok else "failed", "resumed_to": summary.get("step")}


def internal_nccl(out_json: str) -> int:
    """Under torchrun: an NCCL process group, all_reduce and broadcast, then glm's 124m model wrapped in
    DDP for two bf16 steps (at world size 1 glm's own runs apply no DDP wrapper; this one does)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from glm_cli.core.model.config import preset
    from glm_cli.core.model.transformer import Transformer

    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    try:
        x = torch.full((4,), float(rank + 1), device="cuda")
        dist.all_reduce(x)
        box = [{"hello": rank}]
        dist.broadcast_object_list(box, src=0)
        model = DistributedDataParallel(Transformer(preset("124m")).cuda(), device_ids=[rank])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        losses = []
        for _ in range(2):
            idx = torch.randint(0, 32768, (2, 257), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
        dist.barrier()
        Path(out_json).write_text(json.dumps({"backend": dist.get_backend(), "world": dist.get_world_size(),
                                              "all_reduce": x[0].item(), "ddp_losses": losses}))
    finally:
        dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------ 6. decode

def step_decode(c: Check) -> StepResult:
    r = StepResult("decode", "decode the 124m preset, batch 1 and 16, vs transformers")
    cmd = [c.python, str(ROOT / "bench" / "generate.py"), "--device", "cuda", "--preset", "124m", "--dtype",
           "bfloat16", "--batch-sizes", "1,16", "--new-tokens", "128", "--repeats", "3", "--json"]
    r.commands.append(shell_line(cmd))
    if c.dry:
        r.reason = c.skip_reason
        return r
    proc = c.run(cmd, 150, label="bench/generate.py")
    data = last_json(proc.output)
    if not proc.ok or not data:
        return r.fail("timed out" if proc.timed_out else "bench/generate.py failed", proc.tail())
    r.details = data
    problems = []
    for row in data.get("batches", []):
        ok = row["speedup"] >= TARGET_DECODE_SPEEDUP
        r.figures.append(Figure(f"batch {row['batch']} speedup",
                                f"{row['speedup']:.2f}x ({row['glm_tok_s']:.0f} vs {row['transformers_tok_s']:.0f} tok/s)",
                                f">= {TARGET_DECODE_SPEEDUP}x", ok))
        r.figures.append(Figure(f"batch {row['batch']} same greedy tokens", str(row.get("same_tokens"))))
        if not ok:
            problems.append(f"batch {row['batch']} below target")
    r.status = "failed" if problems else "ok"
    r.reason = "; ".join(problems)
    return r


# ------------------------------------------------------------------------------------ 7. report

STEPS = [step_env, step_tests, step_kernel, step_pretrain, step_torchrun, step_decode]
STEP_NAMES = ["env", "tests", "kernel", "pretrain", "torchrun", "decode"]


def targets() -> list[dict]:
    return [
        {"step": "kernel", "figure": "glm / SDPA-flash forward+backward TFLOP/s, hd128, causal, 4k, bf16, GQA 4:1",
         "target": f">= {TARGET_KERNEL_VS_SDPA}x"},
        {"step": "kernel", "figure": "max error of O, dQ, dK, dV against fp32",
         "target": f"<= {ERROR_RATIO:g}x SDPA-flash's + a bf16 floor; LSE <= 1e-2"},
        {"step": "pretrain", "figure": "MFU of the 124m preset (bf16, best backend)", "target": f">= {100 * TARGET_MFU:.0f}%"},
        {"step": "pretrain", "figure": f"loss after {PRETRAIN_STEPS} steps, fused and compiled vs sdpa",
         "target": f"within {100 * LOSS_RTOL:g}%"},
        {"step": "decode", "figure": "glm generate / transformers tokens/s, batch 1 and 16", "target": f">= {TARGET_DECODE_SPEEDUP}x"},
    ]


def write_report(c: Check, results: list[StepResult], started: float) -> tuple[Path, Path]:
    env = next((r.details for r in results if r.name == "env"), {})
    header = {"gpu": env.get("gpu"), "torch": env.get("torch"), "cuda": env.get("cuda"),
              "dry_run": c.dry, "budget_s": c.args.budget, "elapsed_s": round(time.monotonic() - started, 1),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    doc = {**header, "targets": targets(),
           "steps": [{**{k: v for k, v in vars(r).items() if k != "figures"},
                      "figures": [vars(f) for f in r.figures]} for r in results]}
    json_path, md_path = c.out / "gpu-report.json", c.out / "gpu-report.md"
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    lines = [f"# glm GPU check: {header['gpu'] or 'no GPU'}", "",
             f"torch {header['torch']}, CUDA {header['cuda']}, {header['date']}, "
             f"{header['elapsed_s']} s of a {c.args.budget:.0f} s budget" + (" (dry run)" if c.dry else ""), "",
             "| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.name} | {r.status.upper() if r.status == 'failed' else r.status} | {r.seconds:.1f} | "
                     f"{_cell(r.reason)} |")
    lines += ["", "## Targets", "", "| step | figure | target |", "| --- | --- | --- |"]
    lines += [f"| {t['step']} | {t['figure']} | {t['target']} |" for t in targets()]
    for r in results:
        lines += ["", f"## {r.name}: {r.title}", "", f"**{r.status}**" + (f": {r.reason}" if r.reason else "")]
        if r.figures:
            lines += ["", "| figure | value | target | met |", "| --- | --- | --- | --- |"]
            for f in r.figures:
                met = {True: "yes", False: "**no**", None: ""}[f.met]
                value = f"{f.value} {f.unit}".strip() if f.value is not None else "-"
                lines.append(f"| {_cell(f.name)} | {_cell(value)} | {_cell(f.target)} | {met} |")
        if r.cpu_smoke:
            lines += ["", f"CPU smoke run: `{json.dumps(r.cpu_smoke)}`"]
        if r.commands:
            lines += ["", "```", *r.commands, "```"]
        if r.error_tail:
            lines += ["", "last lines:", "```", r.error_tail.strip()[-3000:], "```"]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, json_path


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_internal"]:
        return {"env": internal_env, "kernel-accuracy": internal_kernel_accuracy, "shards": internal_shards,
                "nccl": internal_nccl}[argv[1]](*argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python bench/gpu_check.py gpu-report --only env,kernel")
    parser.add_argument("out", help="report directory (created): gpu-report.md, gpu-report.json, gpu-check.log")
    parser.add_argument("--dry-run", action="store_true",
                        help="walk every step and report it skipped (what runs without CUDA anyway)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="with a dry run, also run the tiny CPU versions of the pretrain and torchrun "
                        "steps through the same builders and parsers (about a minute more)")
    parser.add_argument("--budget", type=float, default=510.0, help="seconds for the whole check (default 510)")
    parser.add_argument("--only", default="", help=f"comma-separated steps to run, of {','.join(STEP_NAMES)} "
                        "(others reported as skipped; env always runs)")
    parser.add_argument("--ext-dir", default=os.environ.get("GLM_CUDA_EXT_DIR") or str(ROOT / "build" / "cuda_ext"),
                        help="where the extension is built and looked up prebuilt (default build/cuda_ext)")
    parser.add_argument("--python", default="", help="interpreter for the steps (default: this one)")
    args = parser.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    if only - set(STEP_NAMES):
        parser.error(f"--only: unknown steps {', '.join(sorted(only - set(STEP_NAMES)))}; "
                     f"choose from {','.join(STEP_NAMES)}")
    started = time.monotonic()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    gpu = _has_cuda(args.python or sys.executable)
    c = Check(args, gpu)
    c.log_path.write_text(f"glm gpu check, {time.strftime('%Y-%m-%d %H:%M:%S')}, dry run: {c.dry}\n")
    results = []
    try:
        for name, step in zip(STEP_NAMES, STEPS, strict=True):
            t = time.monotonic()
            if only and name not in only and name != "env":
                result = StepResult(name, name, reason="not selected (--only)")
            elif c.remaining() < 10:
                result = StepResult(name, name, reason=f"out of time (budget {args.budget:.0f} s)")
            else:
                print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
                try:
                    result = step(c)
                except Exception as exc:  # a bug in this script: record it, go on with the next step
                    import traceback

                    result = StepResult(name, name).fail(f"gpu_check error: {exc!r}", traceback.format_exc())
            result.seconds = round(time.monotonic() - t, 1)
            results.append(result)
            print(f"[gpu-check] {name}: {result.status} ({result.seconds:.0f} s) {result.reason}"[:300],
                  file=sys.stderr, flush=True)
            write_report(c, results, started)  # a partial report survives a kill
    finally:
        shutil.rmtree(c.work, ignore_errors=True)
    md, js = write_report(c, results, started)
    table = md.read_text().split("\n## Targets")[0]
    print(table)
    print(f"report: {md} and {js}; full output: {c.log_path}")
    return 0 if all(r.status != "failed" for r in results) else 1


def _has_cuda(python: str) -> bool:
    try:
        proc = subprocess.run([python, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"],
                              capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


if __name__ == "__main__":
    sys.exit(main())
