"""Pretraining throughput: tokens/s and MFU per preset, glm's engine against plain eager PyTorch.

For each preset, in the same process and on the same synthetic token shards:

- `glm`: `core.train.trainer.Trainer` + `core.train.pretrain_task.PretrainTask` exactly as `glm pretrain` runs them
  (timed from the per-step `step_time` in metrics.jsonl, so checkpoint writing and evaluation are not
  counted);
- `eager`: the same Llama-style model written out plainly in this file (manual softmax attention, no
  SDPA, no fused optimizer) with a bare training loop: same batch, AdamW, clipping, autocast.

MFU = tokens/s * training FLOPs per token (6N + 12 L T d) / peak, the peak being a measured 2048^3 fp32
matmul on the CPU (what bounds a CPU run) or the datasheet dense bf16 peak on a known GPU.

    .venv/bin/python bench/pretrain.py                       # tiny and cpu presets, 8 timed steps
    .venv/bin/python bench/pretrain.py --threads 1 --cpu-time  # idle-core speed on a shared machine
    .venv/bin/python bench/pretrain.py --presets 124m --steps 3 --micro-batch-size 1
    .venv/bin/python bench/pretrain.py --presets 124m --seq-len 1024 --micro-batch-size 16 --compile   # H100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from glm_cli.core.io.shards import ShardIndex, ShardSet, write_shard
from glm_cli.core.model.config import PRESETS, preset
from glm_cli.core.model.transformer import Transformer
from glm_cli.core.train.metrics import peak_flops
from glm_cli.core.train.presets import PRETRAIN_PRESETS
from glm_cli.core.train.pretrain_task import PretrainTask, Source
from glm_cli.core.train.settings import TrainConfig
from glm_cli.core.train.trainer import Trainer

# ------------------------------------------------------------------------- plain eager reference


class EagerLlama(nn.Module):
    """The same architecture, written the obvious way (one parameter dict per layer)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.dim, cfg.head_dim
        self.emb = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList()
        for _ in range(cfg.n_layers):
            layer = nn.ModuleDict(dict(
                wq=nn.Linear(d, cfg.n_heads * hd, bias=False), wk=nn.Linear(d, cfg.n_kv_heads * hd, bias=False),
                wv=nn.Linear(d, cfg.n_kv_heads * hd, bias=False), wo=nn.Linear(cfg.n_heads * hd, d, bias=False),
                w1=nn.Linear(d, cfg.ffn_dim, bias=False), w3=nn.Linear(d, cfg.ffn_dim, bias=False),
                w2=nn.Linear(cfg.ffn_dim, d, bias=False)))
            layer.n1 = nn.Parameter(torch.ones(d))
            layer.n2 = nn.Parameter(torch.ones(d))
            self.layers.append(layer)
        self.norm = nn.Parameter(torch.ones(d))
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.head.weight = self.emb.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0, 0.02)

    @staticmethod
    def rms(x, w, eps):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def forward(self, idx, targets):
        cfg = self.cfg
        B, T = idx.shape
        hd = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=idx.device).float() / hd))
        f = torch.outer(torch.arange(T, device=idx.device).float(), inv)
        cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()

        def rope(x):
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            return x * cos + torch.cat([-x2, x1], -1) * sin

        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
        x = self.emb(idx)
        for L in self.layers:
            h = self.rms(x, L.n1, cfg.norm_eps)
            q = rope(L.wq(h).view(B, T, cfg.n_heads, hd).transpose(1, 2))
            k = rope(L.wk(h).view(B, T, cfg.n_kv_heads, hd).transpose(1, 2))
            v = L.wv(h).view(B, T, cfg.n_kv_heads, hd).transpose(1, 2)
            rep = cfg.n_heads // cfg.n_kv_heads
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            x = x + L.wo((att @ v).transpose(1, 2).reshape(B, T, -1))
            h = self.rms(x, L.n2, cfg.norm_eps)
            x = x + L.w2(F.silu(L.w1(h)) * L.w3(h))
        logits = self.head(self.rms(x, self.norm, cfg.norm_eps))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def eager_tokens_per_s(cfg, batches, device, autocast_dtype, warmup, lr=1e-3, cpu_time=False) -> float:
    clock = time.process_time if cpu_time else time.perf_counter
    torch.manual_seed(0)
    model = EagerLlama(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    elapsed, tokens = 0.0, 0
    for i, (x, y) in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = clock()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = model(x.to(device), y.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            elapsed += clock() - t
            tokens += x.numel()
    return tokens / elapsed


# ---------------------------------------------------------------------------------- glm engine


def synthetic_shards(directory: Path, vocab: int, tokens: int) -> Path:
    rng = np.random.default_rng(0)
    index = ShardIndex(dtype="<u2" if vocab <= 65536 else "<u4", vocab_size=vocab, eot_token_id=0,
                       tokenizer_sha256="bench")
    toks = rng.integers(1, vocab, size=tokens).astype(index.dtype)
    index.shards.append(write_shard(directory, "train-000000", "train", toks, np.array([0]), tokens * 3))
    index.shards.append(write_shard(directory, "val-000000", "val", toks[:4096], np.array([0]), 4096 * 3))
    index.save(directory)
    return directory


def _glm_fit(cfg, shards: Path, run_dir: Path, micro: int, total_steps: int, args) -> float:
    """Run the engine for total_steps; returns the process CPU seconds it took."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    task = PretrainTask(model, [Source(name="bench", train=ShardSet(shards), val=None)], seq_len=cfg.max_seq_len,
                        micro_batch_size=micro)
    tc = TrainConfig(lr=1e-3, max_steps=total_steps, warmup_steps=1, eval_every=0, log_every=0,
                     compile=args.compile, dtype=args.dtype, peak_flops=1.0,
                     activation_checkpointing=args.activation_checkpointing)
    t = time.process_time()
    Trainer(task, tc, run_dir).fit()
    return time.process_time() - t


def glm_tokens_per_s(cfg, shards: Path, run_dir: Path, micro: int, steps: int, warmup: int, args) -> float:
    if args.cpu_time:
        # CPU seconds of (warmup + steps) minus (warmup) steps: setup, checkpoint and export cancel out
        _glm_fit(cfg, shards, run_dir.with_name("once"), micro, warmup, args)  # one-time imports and caches
        short = _glm_fit(cfg, shards, run_dir.with_name("short"), micro, warmup, args)
        full = _glm_fit(cfg, shards, run_dir, micro, warmup + steps, args)
        return steps * micro * cfg.max_seq_len / (full - short)
    _glm_fit(cfg, shards, run_dir, micro, warmup + steps, args)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in recs if "step_time" in r and r["step"] > warmup]
    tokens = sum(micro * cfg.max_seq_len for _ in timed)
    return tokens / sum(r["step_time"] for r in timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,cpu", help="comma-separated presets (default tiny,cpu)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--micro-batch-size", type=int, default=0, help="default: the preset's")
    ap.add_argument("--seq-len", type=int, default=0, help="default: the preset's context")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU seconds instead of wall-clock (with --threads 1: the speed of an "
                    "idle core even when the machine is shared); the roof is then a 1-thread matmul timed the same way")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.bfloat16 if (args.dtype == "bf16" or args.dtype == "auto" and device.type == "cuda") else None
    peak, source = peak_flops(device, autocast or torch.float32)
    if args.cpu_time:
        if device.type != "cpu" or torch.get_num_threads() != 1:
            sys.exit("--cpu-time needs the CPU and --threads 1")
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        a @ b
        best = min(_cpu_seconds(lambda: a @ b) for _ in range(3))
        peak, source = 2 * 2048**3 / best, "2048^3 fp32 matmul per CPU-second, 1 thread"
    print(f"device {device}, {torch.get_num_threads()} threads, peak {peak / 1e9:.0f} GFLOP/s ({source}), "
          f"torch {torch.__version__}", file=sys.stderr)
    rows = []
    for name in args.presets.split(","):
        if name not in PRESETS:
            sys.exit(f"unknown preset {name}")
        overrides = {"max_seq_len": args.seq_len} if args.seq_len else {}
        cfg = preset(name, **overrides)
        micro = args.micro_batch_size or PRETRAIN_PRESETS[name].train.micro_batch_size
        need = cfg.num_params() * 16 + micro * cfg.max_seq_len * cfg.dim * cfg.n_layers * 40
        if device.type == "cpu" and need > 0.6 * _available_memory():
            print(f"{name}: skipped (needs ~{need / 2**30:.1f} GiB)", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            shards = synthetic_shards(tmp / "shards", cfg.vocab_size,
                                      max(100_000, 2 * micro * (cfg.max_seq_len + 1) * (args.steps + args.warmup)))
            glm_tps = glm_tokens_per_s(cfg, shards, tmp / "run", micro, args.steps, args.warmup, args)
            task = PretrainTask(Transformer(preset("tiny")), [Source(name="b", train=ShardSet(shards))],
                                seq_len=cfg.max_seq_len, micro_batch_size=micro)
            batches = [(b["input_ids"], b["targets"]) for b in (task.next_batch()
                                                                for _ in range(args.steps + args.warmup))]
            eager_tps = eager_tokens_per_s(cfg, batches, device, autocast, args.warmup, cpu_time=args.cpu_time)
        fpt = cfg.flops_per_token()
        row = dict(preset=name, params_m=round(cfg.num_params() / 1e6, 2), seq_len=cfg.max_seq_len, micro_batch=micro,
                   glm_tokens_per_s=round(glm_tps), glm_mfu=round(glm_tps * fpt / peak, 4),
                   eager_tokens_per_s=round(eager_tps), eager_mfu=round(eager_tps * fpt / peak, 4),
                   speedup=round(glm_tps / eager_tps, 3), device=str(device), peak_flops=peak, peak_source=source)
        rows.append(row)
        print(f"{name:>5}  {row['params_m']:7.2f}M  T={cfg.max_seq_len:<5} B={micro:<3}  glm {glm_tps:9.0f} tok/s "
              f"MFU {100 * row['glm_mfu']:5.1f}%   eager {eager_tps:9.0f} tok/s MFU {100 * row['eager_mfu']:5.1f}%   "
              f"x{row['speedup']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


def _cpu_seconds(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def _available_memory() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


if __name__ == "__main__":
    main()
