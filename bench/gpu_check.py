"""One GPU check: everything that makes glm a GPU toolchain, in one time-boxed command and one report.

    python bench/gpu_check.py gpu-report                 # on a GPU machine (or: make gpu-check OUT=gpu-report)
    python bench/gpu_check.py gpu-report --dry-run       # anywhere: plan every step, run nothing on a GPU

The plan (steps, order, planned and longest times, the GPU test files, the loss comparison) is in
bench/gpu_plan.py; what runs inside the steps' subprocesses (the environment probe and kernel build,
the kernel's accuracy, synthetic shards, the NCCL probe) in bench/gpu_probes.py; this file runs it. Steps, most informative first, each in its own subprocesses with
timeouts; a failure is recorded (with the last lines of its output) and the next step runs:

  env       GPU, torch, CUDA, nvcc, missing packages; the fused kernel built (timed) or a prebuilt one.
            A kernel that does not build on a GPU fails this step, with the compiler's last lines
  kernel    the kernel against SDPA (flash, cuDNN with K/V expanded for GQA) and fp32: max errors of O,
            LSE, dQ, dK, dV; TFLOP/s from bench/attention.py, beside the published FlashAttention-2/3
            and cuDNN figures for an H100
  tests     `pytest -m gpu` on the test files that hold GPU tests (gpu_plan.gpu_test_files)
  decode    bench/generate.py on the 124m preset at batch 1 and 16 against transformers
  pretrain  `glm pretrain --preset 124m`, bf16, GLM_ATTENTION fused and sdpa from one seed, losses compared
            step by step (gpu_plan.compare_losses); the compiled pair only when torch.compile works
  torchrun  `torchrun --nproc_per_node=1` (NCCL) DDP and FSDP2, a few steps, then --resume; an NCCL probe
  report    OUT/gpu-report.md and OUT/gpu-report.json, every figure beside its target

Every step runs with the repository root as working directory and the root on PYTHONPATH, so glm is
imported from this tree whether or not it is installed (glm_cli/_source_tree.py maps glm_cli.core and
the other sub-packages to the top-level directories). The whole run keeps within --budget seconds
(default 510): a step's time is cut to its planned limit and to what is left.

Without CUDA (or with --dry-run) every step is planned and checked as far as a CPU allows, and the plan
is printed with its planned total: every planned command's interpreter, working directory, environment
and way of starting (`-m`, a script, a torchrun worker) imports glm from this tree (a probe each), the
tests step collects its GPU tests with optional packages hidden, glm parses its own command lines
(`--help` appended: an unknown flag fails), bench/attention.py reaches its no-CUDA exit; --cpu-smoke adds
a 3-step `glm pretrain --preset tiny` and its torchrun launch with --resume. A failed check fails the dry
run (exit 1). tests/cli/test_gpu_check.py runs the dry run in CI with glm not installed.

The extension is built into --ext-dir (default build/cuda_ext, git-ignored); a successful build is
also copied into OUT, to be carried into build/cuda_ext next time so that the env step skips the compile
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


def _load_sibling(name: str):
    """bench/<name>.py as a module (bench/ is never put on sys.path: its scripts have generic names)."""
    spec = importlib.util.spec_from_file_location(f"glm_bench_{name}", HERE.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


plan = _load_sibling("gpu_plan")
PROBES = HERE.with_name("gpu_probes.py")  # what runs inside the steps' subprocesses

# Targets from the issue; each figure in the report is shown beside one of these.
TARGET_KERNEL_VS_SDPA = 0.9   # glm fwd+bwd TFLOP/s over SDPA-flash's, head dim 128, causal, 4k
TARGET_MFU = 0.45             # 124m preset, bf16, best backend
TARGET_DECODE_SPEEDUP = 1.5   # glm generate over transformers, each batch size

# Published forward TFLOP/s on an H100 SXM5, bf16, head dim 128, causal, sequence 4k-16k (the
# FlashAttention-3 paper, Shah et al. 2024, and NVIDIA's cuDNN 9 figures): where the real bar is.
PUBLISHED_FWD_TFLOPS = {"FlashAttention-3": (580, 620), "cuDNN": (520, 540), "FlashAttention-2": (320, 335)}

PRETRAIN_STEPS = 30           # the loss comparison looks at the first plan.LOSS_WINDOW steps
PRETRAIN_MICRO = 16
PRETRAIN_SEQ = 1024
TORCHRUN_LAYERS = 2           # NCCL, DDP/FSDP2 and resume are what is checked: a 2-layer 124m saves fast


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
        self.step_deadline = self.deadline
        self.log_path = self.out / "gpu-check.log"
        self.env = step_env_vars(os.environ, Path(args.ext_dir).resolve())
        self.smoke = args.cpu_smoke
        self.kernel_available: bool | None = None  # decided by the env step
        self.planned: list[tuple[str, list[str], dict]] = []  # (step, argv, extra env) of every planned command

    def remaining(self) -> float:
        return min(self.deadline, self.step_deadline) - time.monotonic()

    def add_command(self, r: StepResult, cmd: list[str], env: dict | None = None) -> list[str]:
        """Record a command this step will run (shown in the report; its import probed in a dry run)."""
        r.commands.append(shell_line(cmd, env))
        self.planned.append((r.name, cmd, env or {}))
        return cmd

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
        """A helper of bench/gpu_probes.py (runs in the step's subprocess), by the steps' interpreter."""
        return [self.python, str(PROBES), *args]

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


def step_env_vars(base: dict, ext_dir: Path) -> dict:
    """The environment of every step: the repository root first on PYTHONPATH (scripts such as
    bench/attention.py import glm from this tree, installed or not, as `-m` commands do through their
    working directory), the kernel's build directory, unbuffered output."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["GLM_CUDA_EXT_DIR"] = str(ext_dir)
    env.setdefault("GLM_ATTENTION", "auto")
    return env


def last_json(text: str):
    """The last JSON object printed in text (a summary after log lines), or None."""
    for match in reversed(list(re.finditer(r"^\{", text, re.M))):
        try:
            return json.JSONDecoder().raw_decode(text[match.start():])[0]
        except json.JSONDecodeError:
            continue
    return None


# ------------------------------------------------------------------------- import probes (dry run)

# What must import, and from which directory of this tree (pyproject's package-dir).
GLM_PACKAGES = {"glm_cli": "glm_cli", "glm_cli.core": "core", "glm_cli.commands": "commands",
                "glm_cli.cuda_ext": "cuda_ext", "glm_cli.cpu_ext": "cpu_ext"}

_PROBE = """
import importlib, json, sys
if sys.argv[1] == "script":
    sys.path[0] = sys.argv[2]  # what `python SCRIPT` puts first; -m and -c both put the working directory
found = {}
for name in sys.argv[3:]:
    try:
        found[name] = importlib.import_module(name).__file__
    except Exception as exc:
        found[name] = "error: " + repr(exc)
print(json.dumps(found))
"""


def import_origin(cmd: list[str]) -> tuple[str, str]:
    """How `cmd` (an interpreter and its arguments) starts the code that imports glm: ("module", name)
    for `python -m name` (the working directory first on sys.path), ("script", its directory) for
    `python path/x.py`. A torchrun launch is judged by its worker, the command after the launcher's
    own options: torchrun starts it as `python -m name` or `python script` in the same directory."""
    args = list(cmd[1:])
    if args[:2] == ["-m", "torch.distributed.run"]:
        args = args[2:]
        while args and args[0].startswith("--"):  # --standalone, --nproc_per_node=1, ...
            args.pop(0)
    if args[:1] == ["-m"]:
        return "module", args[1]
    return "script", str(Path(args[0]).resolve().parent)


def probe_imports(c: Check, cmd: list[str], env: dict, cache: dict) -> dict:
    """Import glm's packages as `cmd` would: its interpreter, working directory (ROOT) and environment,
    and the first sys.path entry its way of starting gives; each must come from this tree."""
    mode, where = import_origin(cmd)
    # what decides where an import comes from: the interpreter, the first sys.path entry and the
    # PYTHON* variables (a step's GLM_ATTENTION does not); every probe runs with the step's full env
    key = (cmd[0], mode, where if mode == "script" else "",
           tuple(sorted((k, v) for k, v in env.items() if k.startswith("PYTHON"))))
    if key in cache:
        return cache[key]
    probe = [cmd[0], "-c", _PROBE, mode, where, *GLM_PACKAGES]
    proc = c.run(probe, 120, env=env, label=f"import probe ({mode} {Path(where).name or where})", force=True)
    found = last_json(proc.output) or {}
    wrong = {}
    for name, directory in GLM_PACKAGES.items():
        want = ROOT / directory / "__init__.py"
        got = found.get(name)
        if got is None or got.startswith("error:") or Path(got).resolve() != want:
            wrong[name] = got or (proc.tail(3) if not proc.ok else "not reported")
    result = {"status": "ok" if not wrong and proc.ok else "failed", "as": f"{mode} {where}"}
    if wrong:
        result["wrong"] = wrong
    cache[key] = result
    return result


def check_step_imports(c: Check, r: StepResult, cache: dict) -> None:
    """Dry run: probe the imports of every command step r planned; a failure fails the step."""
    probes = [probe_imports(c, cmd, env, cache) for step, cmd, env in c.planned if step == r.name]
    r.cpu_smoke = {**(r.cpu_smoke or {}), "imports": {
        "status": "ok" if all(p["status"] == "ok" for p in probes) else "failed",
        "commands": len(probes), "failed": [p for p in probes if p["status"] != "ok"]}}


def cpu_checks_failed(r: StepResult) -> list[str]:
    """The names of a dry run's CPU checks of this step that failed."""
    return [name for name, check in (r.cpu_smoke or {}).items()
            if isinstance(check, dict) and check.get("status") == "failed"]


# ---------------------------------------------------------------------------------- 1. environment

def step_env(c: Check) -> StepResult:
    r = StepResult("env", "environment and kernel build")
    out_json = c.work / "env.json"
    cmd = c.add_command(r, c.script("env", str(out_json), str(c.out)))
    proc = c.run(cmd, plan.BY_NAME["env"].limit_s, label="env", force=True)  # cheap on a CPU: the probe is the smoke test
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
        r.cpu_smoke = {"env probe": {"status": "ok" if proc.ok else "failed", "seconds": round(proc.seconds, 1),
                                     **({} if proc.ok else {"tail": proc.tail(8)})}}
        r.reason = f"{c.skip_reason} on a GPU (the probe itself ran: {b.get('status')}, {b.get('reason', '')})"
        return r
    r.status, r.reason, tail = env_verdict(info, proc.ok, proc.timed_out)
    r.error_tail = tail or ("" if proc.ok else proc.tail())
    return r


def env_verdict(info: dict, probe_ok: bool, timed_out: bool = False) -> tuple[str, str, str]:
    """(status, reason, compiler tail) of the env step on a GPU. The kernel is what the check is for:
    one that does not build fails the step loudly, with the compiler's last lines, rather than
    letting the later steps quietly measure SDPA."""
    b = info.get("build") or {}
    if b.get("status") != "ok":
        why = "timed out" if timed_out and not b else b.get("reason") or "no build result"
        return "failed", f"the fused kernel did not build: {why}", b.get("tail", "")
    if not probe_ok:
        return "failed", "the probe exited with an error", ""
    return "ok", "prebuilt kernel loaded" if b.get("prebuilt_used") else "", ""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------- 2. tests

def step_tests(c: Check) -> StepResult:
    r = StepResult("tests", plan.BY_NAME["tests"].title)
    files = plan.gpu_test_files(ROOT)
    r.details["files"] = files
    pytest_args = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=", *files]
    cmd = c.add_command(r, [c.python, "-m", "pytest", *pytest_args])
    if c.dry:
        r.reason = c.skip_reason
        r.cpu_smoke = {"collection": collect_gpu_tests(c, pytest_args, files)}
        return r
    if not files:
        return r.fail("no test file marks a test with pytest.mark.gpu")
    proc = c.run(cmd, plan.BY_NAME["tests"].limit_s, label="pytest -m gpu")
    summary = pytest_summary(proc.output)
    r.figures.append(Figure("summary", summary or "(none)", "no failures", proc.ok))
    r.status = "ok" if proc.ok else "failed"
    if not proc.ok:
        r.reason = "timed out" if proc.timed_out else "GPU tests failed"
        r.error_tail = failing_lines(proc.output) or proc.tail()
    return r


_COLLECT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as on a machine without it: importing it raises ImportError
import pytest
sys.exit(pytest.main(["--collect-only", *sys.argv[2:]]))
"""


def collect_gpu_tests(c: Check, pytest_args: list[str], files: list[str]) -> dict:
    """Dry run: collect the planned GPU tests as the step will (same interpreter, working directory,
    environment, arguments; `-c` puts the working directory first on sys.path exactly as `-m` does),
    with the packages a bare GPU machine may lack hidden. Fails on a collection error, on no GPU test
    collected, or when the kernel's GPU tests are not among them."""
    cmd = [c.python, "-c", _COLLECT, ",".join(plan.OPTIONAL_PACKAGES), *pytest_args]
    proc = c.run(cmd, 180, label="collect GPU tests", force=True)
    ids = [ln.strip() for ln in proc.output.splitlines() if "::" in ln and ln.strip().startswith("tests/")]
    kernel = [i for i in ids if i.startswith(plan.KERNEL_TESTS + "::")]
    problems = []
    if plan.KERNEL_TESTS not in files:
        problems.append(f"{plan.KERNEL_TESTS} is not planned")
    if not proc.ok:
        problems.append(f"pytest --collect-only exited {proc.rc}")
    if not kernel:
        problems.append(f"no GPU test of {plan.KERNEL_TESTS} collected")
    out = {"status": "failed" if problems else "ok", "files": files, "collected": len(ids),
           "kernel_tests": len(kernel), "hidden": list(plan.OPTIONAL_PACKAGES)}
    if problems:
        out.update(problems=problems, tail=proc.tail(12))
    return out


def pytest_summary(output: str) -> str:
    for line in reversed(output.splitlines()):
        if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line):
            return line.strip("= ").strip()
    return ""


def failing_lines(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return "\n".join(lines[:30])


# ------------------------------------------------------------------------------------ 3. kernel

def step_kernel(c: Check) -> StepResult:
    r = StepResult("kernel", plan.BY_NAME["kernel"].title)
    acc_json, bench_json = c.work / "kernel_accuracy.json", c.work / "attention.json"
    acc_cmd = c.add_command(r, c.script("kernel-accuracy", str(acc_json)))
    bench_cmd = c.add_command(r, [c.python, str(ROOT / "bench" / "attention.py"), "--seqs", plan.ATTN_SEQS,
                           "--head-dims", plan.ATTN_HEAD_DIMS, "--causal", "both", "--dtype", "bf16",
                           "--gqa", str(plan.ATTN_GQA), "--warmup", "3", "--iters", "10", "--json", str(bench_json)])
    if c.dry:
        r.reason = c.skip_reason
        r.cpu_smoke = {"bench/attention.py arguments": c.validate(bench_cmd, "no-cuda")}
        return r
    if not c.kernel_available:
        r.reason = "the fused extension is not available (step env)"
        return r
    acc = c.run(acc_cmd, 75, label="kernel accuracy")
    bench = c.run(bench_cmd, 90, label="bench/attention.py")
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
            r.figures.append(Figure(label, case.get("summary"), f"glm <= {plan.ERROR_RATIO:g}x SDPA-flash + floor",
                                    ok))
            if ok is False:
                problems.append(f"{label} over target")
        for row in data.get("cudnn", []):
            value = row.get("error") or (f"fwd {row.get('fwd_tflops')}, f+b {row.get('fwdbwd_tflops')} TFLOP/s "
                                         "(K/V expanded for GQA)")
            r.figures.append(Figure(f"cuDNN hd{row['head_dim']} T{row['seq']} causal", value))
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
        r.figures += published_bar_figures(rows, (data or {}).get("cudnn", []))
    r.status = "failed" if problems or not acc.ok or not bench.ok else "ok"
    r.reason = "; ".join(problems)
    return r


def published_bar_figures(rows: list[dict], cudnn: list[dict]) -> list[Figure]:
    """glm's forward TFLOP/s at head dim 128, causal, 4k and 8k, as a share of the published H100
    figures (PUBLISHED_FWD_TFLOPS), beside what SDPA-flash and cuDNN measured here: how far the
    real bar is. The published figures are for an H100 SXM5; on another GPU they are context only."""
    measured_cudnn = {row["seq"]: row.get("fwd_tflops") for row in cudnn}
    figures = []
    for row in rows:
        if not (row.get("head_dim") == 128 and row.get("causal") and row.get("seq") in (4096, 8192)):
            continue
        glm = row.get("glm_fwd_tflops")
        if not glm:
            continue
        shares = ", ".join(f"{100 * glm / ((lo + hi) / 2):.0f}% of {name} ({lo}-{hi})"
                           for name, (lo, hi) in PUBLISHED_FWD_TFLOPS.items())
        here = f"; here SDPA-flash {row.get('sdpa_fwd_tflops') or 0:.0f}"
        if measured_cudnn.get(row["seq"]):
            here += f", cuDNN {measured_cudnn[row['seq']]:.0f}"
        figures.append(Figure(f"fwd hd128 T{row['seq']} causal vs published H100", f"glm {glm:.0f} TFLOP/s = "
                              f"{shares}{here}", f"FlashAttention-3 {PUBLISHED_FWD_TFLOPS['FlashAttention-3'][0]}+"))
    return figures


def _fmt_ratio(g, s, gf, sf) -> str:
    if not (g and s):
        return "n/a"
    return f"{g / s:.2f}x (f+b {g:.0f} vs {s:.0f}; fwd {gf or 0:.0f} vs {sf or 0:.0f} TFLOP/s)"


# ---------------------------------------------------------------------------------- 4. pretrain

def pretrain_cmd(c: Check, shards: Path, run_dir: Path, preset: str, steps: int, micro: int, seq: int,
                 compile_: bool, device: str = "cuda", dtype: str = "bf16", checkpoint_every: int = 0,
                 sets: tuple[str, ...] = ()) -> list[str]:
    cmd = c.glm("pretrain", str(shards), "-o", str(run_dir), "--preset", preset, "--max-steps", str(steps),
                "-b", str(micro), "--batch-tokens", str(micro * seq), "--eval-every", "0",
                "--checkpoint-every", str(checkpoint_every), "--set", f"max_seq_len={seq}", "--set", "warmup_steps=10",
                *[a for kv in sets for a in ("--set", kv)],
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
            "loss": round(sum(r["loss"] for r in last) / len(last), 4), "first_loss": round(steps[0]["loss"], 4),
            "losses": [r["loss"] for r in steps]}


# In this order: the eager pair first (the loss comparison that matters most), then the compiled pair,
# sdpa+compile first: it is torch's own path, so when it fails torch.compile does not work on this
# machine and fused+compile is not tried. Pairs compared: (under test, reference), same seed and data.
PRETRAIN_RUNS = (("fused", False), ("sdpa", False), ("sdpa", True), ("fused", True))
LOSS_PAIRS = (("fused", "sdpa"), ("sdpa+compile", "sdpa"), ("fused+compile", "sdpa+compile"))


def step_pretrain(c: Check) -> StepResult:
    r = StepResult("pretrain", f"glm pretrain 124m, {PRETRAIN_STEPS} steps, bf16, fused/sdpa x eager/compile")
    shards = c.work / "shards"
    shard_cmd = c.add_command(r, c.script("shards", str(shards), "32768", str(6_000_000)))
    runs = []
    for attention, compile_ in PRETRAIN_RUNS:
        name = f"{attention}{'+compile' if compile_ else ''}"
        cmd = pretrain_cmd(c, shards, c.work / "runs" / name, "124m", PRETRAIN_STEPS, PRETRAIN_MICRO,
                           PRETRAIN_SEQ, compile_)
        runs.append((name, attention, c.add_command(r, cmd, {"GLM_ATTENTION": attention})))
    if c.dry:
        r.reason = c.skip_reason
        r.cpu_smoke = {"glm pretrain arguments": c.validate(runs[-1][2], "help")}
        if c.smoke:
            r.cpu_smoke["tiny run"] = pretrain_smoke(c)
        return r
    made = c.run(shard_cmd, 60, label="synthetic shards")
    if not made.ok:
        return r.fail("could not write the synthetic shards", made.tail())
    results, problems = {}, []
    for name, attention, cmd in runs:
        skip = None
        if attention == "fused" and not c.kernel_available:
            skip = "the fused extension is not available"
        elif name == "fused+compile" and "sdpa+compile" not in results:
            skip = "torch.compile did not work with SDPA (sdpa+compile), so not tried with the kernel"
        elif c.remaining() < 30:
            skip = "out of time"
            problems.append(f"{name}: out of time")
        if skip:
            r.details[name] = {"status": "skipped", "reason": skip}
            continue
        proc = c.run(cmd, 120 if "compile" in name else 60, env={"GLM_ATTENTION": attention}, label=name)
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
    for name, reference in LOSS_PAIRS:
        if name in results and reference in results:
            v = plan.compare_losses(results[name]["losses"], results[reference]["losses"])
            r.details[f"loss {name} vs {reference}"] = v
            r.figures.append(Figure(
                f"loss {name} vs {reference}, steps 1-{v['steps']}",
                f"max {100 * v['max_rel']:.2f}% (step {v['worst_step']}), mean {100 * v['mean_rel']:+.2f}%",
                f"each step <= {100 * v['band']:.1f}%, mean <= {100 * v['mean_band']:.2f}%", v["ok"]))
            if not v["ok"]:
                problems.append(f"loss {name} vs {reference}: {v['reason']}")
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


# ---------------------------------------------------------------------------------- 5. torchrun

def step_torchrun(c: Check) -> StepResult:
    r = StepResult("torchrun", plan.BY_NAME["torchrun"].title)
    shards = c.work / "shards"
    shard_cmd = c.script("shards", str(shards), "32768", str(6_000_000))
    if not (shards / "index.json").is_file():
        c.add_command(r, shard_cmd)
    launcher = [c.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    probe = [*launcher, str(PROBES), "nccl", str(c.work / "nccl.json")]
    plans = [("nccl probe", probe, None, None)]
    for mode in ("ddp", "fsdp"):
        run_dir = c.work / "runs" / f"torchrun-{mode}"
        glm_args = pretrain_cmd(c, shards, run_dir, "124m", 2, 8, PRETRAIN_SEQ, False, checkpoint_every=2,
                                sets=(f"n_layers={TORCHRUN_LAYERS}",))[3:]
        base = [*launcher, "-m", "glm_cli", *glm_args] + (["--fsdp"] if mode == "fsdp" else [])
        resume = [*base, "--resume"]
        resume[resume.index("--max-steps") + 1] = "3"
        plans += [(f"{mode} 2 steps", base, None, mode), (f"{mode} resumed to 3", resume, 3, mode)]
    for p in plans:
        c.add_command(r, p[1])
    if c.dry:
        r.reason = c.skip_reason
        fsdp_resume = plans[-1][1]
        glm_part = [c.python, *fsdp_resume[fsdp_resume.index("-m", len(launcher)):]]
        r.cpu_smoke = {"glm pretrain arguments": c.validate(glm_part, "help")}
        if c.smoke:
            r.cpu_smoke["tiny run"] = torchrun_smoke(c, launcher)
        return r
    if not (shards / "index.json").is_file():
        made = c.run(shard_cmd, 60, label="shards")
        if not made.ok:
            return r.fail("could not write the synthetic shards", made.tail())
    problems = []
    for label, cmd, want_step, want_mode in plans:
        proc = c.run(cmd, 60, label=label)
        ok = proc.ok
        note = "ok"
        if ok and want_mode is not None:
            # `glm pretrain --json` says which wrapping really ran (`parallel`: "ddp" or "fsdp"); a run
            # that fell back to a plain single-process loop must not count as DDP/FSDP2 verified.
            summary = last_json(proc.output) or {}
            ran = summary.get("parallel")
            ok = ran == want_mode and (want_step is None or (
                summary.get("step") == want_step and summary.get("status") == "completed"))
            note = (f"step {summary.get('step')}, {summary.get('status')}, parallel={ran}, "
                    f"world_size={summary.get('world_size')}")
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
    """torchrun (one process on CPU, gloo: a real one-rank DDP group) on the tiny preset, then --resume."""
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
    ok = summary.get("step") == 3 and summary.get("status") == "completed" and summary.get("parallel") == "ddp"
    return {"status": "ok" if ok else "failed", "resumed_to": summary.get("step"),
            "parallel": summary.get("parallel")}


# ------------------------------------------------------------------------------------ 6. decode

def step_decode(c: Check) -> StepResult:
    r = StepResult("decode", plan.BY_NAME["decode"].title)
    cmd = c.add_command(r, [c.python, str(ROOT / "bench" / "generate.py"), "--device", "cuda", "--preset", "124m",
                     "--dtype", "bfloat16", "--batch-sizes", "1,16", "--new-tokens", "128", "--repeats", "3",
                     "--json"])
    if c.dry:
        r.reason = c.skip_reason
        return r
    proc = c.run(cmd, plan.BY_NAME["decode"].limit_s, label="bench/generate.py")
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

STEP_FUNCTIONS = {"env": step_env, "kernel": step_kernel, "tests": step_tests, "decode": step_decode,
                  "pretrain": step_pretrain, "torchrun": step_torchrun}
STEP_NAMES = plan.STEP_NAMES  # the order they run in


def targets() -> list[dict]:
    return [
        {"step": "kernel", "figure": "glm / SDPA-flash forward+backward TFLOP/s, hd128, causal, 4k, bf16, GQA 4:1",
         "target": f">= {TARGET_KERNEL_VS_SDPA}x"},
        {"step": "kernel", "figure": "max error of O, dQ, dK, dV against fp32",
         "target": f"<= {plan.ERROR_RATIO:g}x SDPA-flash's + a bf16 floor; LSE <= 1e-2"},
        {"step": "pretrain", "figure": "MFU of the 124m preset (bf16, best backend)", "target": f">= {100 * TARGET_MFU:.0f}%"},
        {"step": "pretrain", "figure": f"loss, step by step over steps 1-{plan.LOSS_WINDOW}: fused vs sdpa, "
         "compiled vs eager, fused+compile vs sdpa+compile (same seed and data)",
         "target": f"each step within {100 * plan.LOSS_STEP_BAND:.1f}%, mean within {100 * plan.LOSS_MEAN_BAND:.2f}% "
                   "(bf16: docs/cuda_ext.md)"},
        {"step": "decode", "figure": "glm generate / transformers tokens/s, batch 1 and 16", "target": f">= {TARGET_DECODE_SPEEDUP}x"},
    ]


def write_report(c: Check, results: list[StepResult], started: float) -> tuple[Path, Path]:
    env = next((r.details for r in results if r.name == "env"), {})
    header = {"gpu": env.get("gpu"), "torch": env.get("torch"), "cuda": env.get("cuda"),
              "dry_run": c.dry, "budget_s": c.args.budget, "elapsed_s": round(time.monotonic() - started, 1),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    doc = {**header, "planned_total_s": plan.planned_total(),
           "plan": [{"step": p.name, "planned_s": p.planned_s, "limit_s": p.limit_s, "estimate": p.estimate}
                    for p in plan.STEPS],
           "targets": targets(),
           "steps": [{**{k: v for k, v in vars(r).items() if k != "figures"},
                      "figures": [vars(f) for f in r.figures]} for r in results]}
    json_path, md_path = c.out / "gpu-report.json", c.out / "gpu-report.md"
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    lines = [f"# glm GPU check: {header['gpu'] or 'no GPU'}", "",
             f"torch {header['torch']}, CUDA {header['cuda']}, {header['date']}, "
             f"{header['elapsed_s']} s of a {c.args.budget:.0f} s budget" + (" (dry run)" if c.dry else "")
             + f"; planned on a bare H100 machine: {plan.planned_total()} s", "",
             "| step | status | seconds | planned | note |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.name} | {r.status.upper() if r.status == 'failed' else r.status} | {r.seconds:.1f} | "
                     f"{plan.BY_NAME[r.name].planned_s} | {_cell(r.reason)} |")
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python bench/gpu_check.py gpu-report --only env,kernel")
    parser.add_argument("out", help="report directory (created): gpu-report.md, gpu-report.json, gpu-check.log")
    parser.add_argument("--dry-run", action="store_true",
                        help="walk every step and report it skipped (what runs without CUDA anyway)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="with a dry run, also run the tiny CPU versions of the pretrain and torchrun "
                        "steps through the same builders and parsers (about a minute more)")
    parser.add_argument("--budget", type=float, default=float(plan.DEFAULT_BUDGET_S),
                        help=f"seconds for the whole check (default {plan.DEFAULT_BUDGET_S})")
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
    selected = [n for n in STEP_NAMES if not only or n in only or n == "env"]
    print(f"[gpu-check] plan{' (dry run)' if c.dry else ''}:\n{plan.format_plan(args.budget, selected)}",
          file=sys.stderr, flush=True)
    results, probes = [], {}
    try:
        for name in STEP_NAMES:
            t = time.monotonic()
            if name not in selected:
                result = StepResult(name, name, reason="not selected (--only)")
            elif c.remaining() < 10:
                result = StepResult(name, name, reason=f"out of time (budget {args.budget:.0f} s)")
            else:
                print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
                # a step's limit is for the GPU; a dry run's CPU checks keep to the budget alone
                c.step_deadline = c.deadline if c.dry else t + plan.BY_NAME[name].limit_s
                try:
                    result = STEP_FUNCTIONS[name](c)
                    if c.dry:
                        check_step_imports(c, result, probes)
                        failed = cpu_checks_failed(result)
                        if failed:
                            result.status = "failed"
                            result.reason = f"CPU check failed: {', '.join(failed)} (see cpu_smoke)"
                except Exception as exc:  # a bug in this script: record it, go on with the next step
                    import traceback

                    result = StepResult(name, name).fail(f"gpu_check error: {exc!r}", traceback.format_exc())
                finally:
                    c.step_deadline = c.deadline
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
