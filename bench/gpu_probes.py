"""What runs inside the GPU check's subprocesses (bench/gpu_check.py starts each with the steps' interpreter):

    python bench/gpu_probes.py env OUT_JSON EXPORT_DIR          versions; build or load the fused kernel
    python bench/gpu_probes.py kernel-accuracy OUT_JSON         kernel vs SDPA-flash, SDPA-cuDNN and fp32
    python bench/gpu_probes.py shards DIR VOCAB TOKENS          synthetic token shards for pretraining
    torchrun ... bench/gpu_probes.py nccl OUT_JSON              NCCL collectives and two DDP steps

Each writes JSON for the runner to read. glm is imported from the repository (the runner puts its root
on PYTHONPATH); this directory is kept off sys.path (bench/ holds scripts with generic names).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _load_sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"glm_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


plan = _load_sibling("gpu_plan")
ATTN_GQA, ERROR_RATIO = plan.ATTN_GQA, plan.ERROR_RATIO


# ------------------------------------------------------------------------------------------- env

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
            info["build"] = {"status": "failed", "seconds": time.monotonic() - start, **build_failure(exc)}
            print(str(exc)[-4000:], file=sys.stderr)
    Path(out_json).write_text(json.dumps(info, indent=1))
    return 0


def build_failure(exc: BaseException, tail_lines: int = 40) -> dict:
    """A failed build as the report shows it: a one-line reason (the first compiler error when there
    is one, else the message's first line) and the last lines of the compiler's output."""
    text = str(exc).strip() or repr(exc)
    lines = text.splitlines()
    first_error = next((ln.strip() for ln in lines[1:] if re.search(r"\berror\b", ln, re.I)
                        and not ln.lstrip().startswith("ninja:")), "")
    reason = lines[0].strip()
    if first_error and first_error != reason:
        reason = f"{reason} ({first_error})"
    return {"reason": reason[:300], "tail": "\n".join(lines[-tail_lines:])}


class _suppress_all:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


# ---------------------------------------------------------------------------------------- kernel

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
    def sdpa_flash(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=causal, enable_gqa=True)

    def sdpa_cudnn(a, b, c):  # no enable_gqa in cuDNN's backend: expand K/V (their gradients sum back)
        return F.scaled_dot_product_attention(a, expand_kv(b, ATTN_GQA), expand_kv(c, ATTN_GQA), is_causal=causal)

    for name, backend, fn in (("sdpa_flash", SDPBackend.FLASH_ATTENTION, sdpa_flash),
                              ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION, sdpa_cudnn)):
        try:
            with sdpa_kernel(backend):
                row[name] = errors(fn)
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
    """cuDNN's forward and forward+backward TFLOP/s at GQA 4:1. SDPA's cuDNN backend takes no
    `enable_gqa`, so K/V are expanded to all query heads first (outside the timing: what a model using
    cuDNN this way would also pay is a copy, not attention work)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, batch = 2048 // head_dim, max(1, 16384 // seq)
    opts = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, heads, seq, head_dim, **opts).requires_grad_(True)
    k, v = (expand_kv(torch.randn(batch, heads // ATTN_GQA, seq, head_dim, **opts), ATTN_GQA)
            .requires_grad_(True) for _ in range(2))
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

    flops = 4.0 * batch * heads * seq * seq * head_dim / 2  # causal: half the score matrix
    row = {"seq": seq, "head_dim": head_dim, "fwd_tflops": None, "fwdbwd_tflops": None, "kv_expanded": True}
    try:
        row["fwd_tflops"] = round(flops / bench._time_ms(fwd, 3, 10) / 1e9, 1)
        row["fwdbwd_tflops"] = round(3.5 * flops / bench._time_ms(fwd_bwd, 3, 10) / 1e9, 1)
    except RuntimeError as exc:
        row["error"] = str(exc).splitlines()[0][:160]
    return row


def expand_kv(x, group: int):
    """(B, Hkv, T, D) -> (B, Hkv * group, T, D): each K/V head repeated for the query heads that share it
    (query head h reads K/V head h // group), for backends without `enable_gqa`."""
    return x.repeat_interleave(group, 1)


def _load_bench_attention():
    """bench/attention.py as a module (bench/ is never put on sys.path: it holds names like tokenize.py)."""
    spec = importlib.util.spec_from_file_location("glm_bench_attention", ROOT / "bench" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------- shards

PHRASE, BLOCK, COPIES = 64, 16, 4  # a 128-token unit: a pool phrase, then a fresh block 4 times


def synthetic_tokens(rng, vocab: int, n: int, phrases):
    """n tokens in 128-token units: a phrase from the pool `phrases` (learnable from the token before
    it, so the loss falls), then a fresh random 16-token block repeated 4 times (predictable only by
    attending 16 positions back: a wrong attention backend trains differently there, which the loss
    comparison needs to see; bench/loss_band.py)."""
    import numpy as np

    units = n // (PHRASE + BLOCK * COPIES) + 1
    head = phrases[rng.integers(0, len(phrases), size=units)]
    blocks = np.tile(rng.integers(1, vocab, size=(units, BLOCK)), (1, COPIES))
    return np.concatenate([head, blocks], axis=1).ravel()[:n]


def internal_shards(directory: str, vocab: str, tokens: str) -> int:
    """Token shards for the pretraining runs (synthetic_tokens; no tokenizer)."""
    import numpy as np

    from glm_cli.core.io.shards import ShardIndex, write_shard

    vocab_n, n = int(vocab), int(tokens)
    rng = np.random.default_rng(0)
    directory_p = Path(directory)
    directory_p.mkdir(parents=True, exist_ok=True)
    index = ShardIndex(dtype="<u2" if vocab_n <= 65536 else "<u4", vocab_size=vocab_n, eot_token_id=0,
                       tokenizer_sha256="gpu-check")
    phrases = rng.integers(1, vocab_n, size=(512, PHRASE))
    toks = synthetic_tokens(rng, vocab_n, n, phrases).astype(index.dtype)
    val = synthetic_tokens(rng, vocab_n, 4096, phrases).astype(index.dtype)
    index.shards.append(write_shard(directory_p, "train-000000", "train", toks, np.array([0]), n * 3))
    index.shards.append(write_shard(directory_p, "val-000000", "val", val, np.array([0]), len(val) * 3))
    index.save(directory_p)
    return 0


# -------------------------------------------------------------------------------------- torchrun

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


HELPERS = {"env": internal_env, "kernel-accuracy": internal_kernel_accuracy, "shards": internal_shards,
           "nccl": internal_nccl}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in HELPERS:
        print(f"usage: python bench/gpu_probes.py {{{','.join(HELPERS)}}} ARGS... (run by bench/gpu_check.py)",
              file=sys.stderr)
        return 2
    return HELPERS[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main())
