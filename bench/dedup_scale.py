"""`glm dedup cluster` at scale: peak memory and time against the number of documents.

    nice .venv/bin/python bench/dedup_scale.py --docs 1e6,3e6,1e7 --memory-mb 256
    nice .venv/bin/python bench/dedup_scale.py --docs 1e6 --memory-mb 256,1024     # one size, two budgets

Generates synthetic signature files (shards of --shard-docs documents, in bench/data/dedup_scale/, not
committed; reused when present) and runs `glm dedup cluster` on each corpus in a fresh subprocess,
recording its peak RSS, wall and CPU time (/usr/bin/time). Writes the table as JSON to
bench/results/dedup_scale.json and the plot to docs/dedup_scale.png.

Synthetic documents: each is an original, an exact copy (5 %) or a near copy (10 %) of a random
earlier document. Band hashes and the bottom-k sketch are functions of the content: an original's
are its own; an exact copy has its source's exact hash, bands and sketch; a near copy keeps each band of
its source with probability 0.53 (0.9**6: Jaccard ~0.9 at 6 rows a band) and 95 % of its sketch
(estimated Jaccard ~0.9). The sketch has --sketch entries (64 by default instead of 512, to keep 10M
documents at ~4.5 GB of disk; the clustering's memory does not depend on it). Settings otherwise the
defaults: threshold 0.8, 18 bands of 6 rows; exact dedup on, lines and contamination off.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from glm_cli.core.dedup.minhash import mix64
from glm_cli.core.dedup.pipeline import DedupConfig, Signatures

ROOT = Path(__file__).resolve().parent.parent
EXACT_COPY, NEAR_COPY = 0.05, 0.10


def _h(values: np.ndarray, salt: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return mix64(values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt))


def make_shard(config: DedupConfig, g0: int, n: int, shard: tuple[int, int], seed: int) -> Signatures:
    rng = np.random.default_rng([seed, shard[0]])
    idx = np.arange(g0, g0 + n, dtype=np.int64)
    kind = rng.random(n)
    copy = (kind < EXACT_COPY + NEAR_COPY) & (idx > 0)
    near = copy & (kind >= EXACT_COPY)
    source = np.where(copy, (rng.random(n) * np.maximum(idx, 1)).astype(np.int64), idx)
    b, k = config.bands, config.sketch
    with np.errstate(over="ignore"):
        bands = _h(source[:, None] * b + np.arange(b)[None, :], 1)
        redo = near[:, None] & (rng.random((n, b)) > 0.53)
        bands[redo] = _h((idx[:, None] * b + np.arange(b)[None, :])[redo], 2)
        sketch = (_h(source[:, None] * k + np.arange(k)[None, :], 3) >> np.uint64(32)).astype(np.uint32)
        edits = near[:, None] & (rng.random((n, k)) < 0.05)
        sketch[edits] = rng.integers(0, 1 << 32, int(edits.sum()), dtype=np.uint64).astype(np.uint32)
    sketch = np.minimum(sketch, np.uint32(0xFFFFFFFE))
    sketch.sort(axis=1)
    exact = _h(np.where(near, idx + (1 << 40), source), 4)
    return Signatures(config=config, shard=shard, ids=[f"doc{g}" for g in range(g0, g0 + n)],
                      nbytes=np.zeros(n, np.int64), exact=exact, bands=bands, sketch=sketch,
                      shingled=np.ones(n, bool), contam=np.zeros(n, np.int32), contam_eval_ids={},
                      line_hashes=np.zeros(0, np.uint64), line_counts=np.zeros(n, np.int64))


def make_corpus(docs: int, shard_docs: int, sketch: int, seed: int) -> Path:
    out = ROOT / "bench/data/dedup_scale" / f"n{docs}-k{sketch}-s{seed}"
    shards = -(-docs // shard_docs)
    if (out / "complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = DedupConfig(lines=False, sketch=sketch).resolved()
    for s in range(shards):
        g0 = s * shard_docs
        n = min(shard_docs, docs - g0)
        make_shard(config, g0, n, (s, shards), seed).save(out / f"{s:05d}.npz")
        print(f"  generated shard {s + 1}/{shards}", file=sys.stderr)
    (out / "complete").write_text("")
    return out


def run_cluster(sig_dir: Path, memory_mb: int) -> dict:
    """One `glm dedup cluster` in a fresh process, measured by /usr/bin/time (a small process before it
    execs: `wait4` on a child forked from this big process would report this process's RSS)."""
    plan = sig_dir / f"plan-{memory_mb}.json"
    timing = sig_dir / "time.txt"
    cmd = ["/usr/bin/time", "-f", "%M %e %U %S", "-o", str(timing), sys.executable, "-m", "glm_cli", "dedup",
           "cluster", *sorted(map(str, sig_dir.glob("*.npz"))), "-o", str(plan), "--memory-mb", str(memory_mb),
           "--json", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"glm dedup cluster failed: {proc.stderr.decode()[-2000:]}")
    summary = json.loads(proc.stdout)
    max_kb, wall, user, system = timing.read_text().split()[-4:]
    return {"seconds": round(float(wall), 1), "cpu_seconds": round(float(user) + float(system), 1),
            "peak_rss_mb": round(int(max_kb) / 1024, 1), "plan_mb": round(plan.stat().st_size / 1e6, 2),
            "exact_duplicates": summary["exact_duplicates"], "near_duplicates": summary["near_duplicates"],
            "near_candidate_pairs": summary["near_candidate_pairs"], "partitions": summary["partitions"]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mem in sorted({r["memory_mb"] for r in rows}):
        sel = sorted((r for r in rows if r["memory_mb"] == mem), key=lambda r: r["documents"])
        x = [r["documents"] / 1e6 for r in sel]
        ax1.plot(x, [r["peak_rss_mb"] for r in sel], "o-", label=f"--memory-mb {mem}")
        line, = ax2.plot(x, [r["cpu_seconds"] for r in sel], "o-", label=f"CPU s, --memory-mb {mem}")
        ax2.plot(x, [r["seconds"] for r in sel], "o--", color=line.get_color(), alpha=0.5,
                 label=f"wall s, --memory-mb {mem}")
    xs = np.array(sorted({r["documents"] for r in rows})) / 1e6
    ax1.plot(xs, xs * 5, "k:", label="5 bytes/document (reason + parent)")
    ax1.set(xlabel="documents (millions)", ylabel="peak RSS (MB)", title="glm dedup cluster: peak memory")
    ax2.set(xlabel="documents (millions)", ylabel="seconds (shared 2-core machine)", title="time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="center right" if ax is ax1 else "lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", default="1e6,3e6,1e7", help="corpus sizes, comma-separated")
    ap.add_argument("--memory-mb", default="256", help="budgets, comma-separated")
    ap.add_argument("--shard-docs", type=int, default=1_000_000)
    ap.add_argument("--sketch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", default=str(ROOT / "docs/dedup_scale.png"))
    ap.add_argument("--json-out", default=str(ROOT / "bench/results/dedup_scale.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from --json-out")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.json_out).read_text()), Path(args.png))
        return
    rows = []
    for docs in (int(float(d)) for d in args.docs.split(",")):
        sig_dir = make_corpus(docs, args.shard_docs, args.sketch, args.seed)
        for mem in (int(m) for m in args.memory_mb.split(",")):
            row = {"documents": docs, "memory_mb": mem, **run_cluster(sig_dir, mem)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, Path(args.png))
    print("| documents | --memory-mb | peak RSS (MB) | wall s | CPU s | partitions per band | plan (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['documents']:,} | {r['memory_mb']} | {r['peak_rss_mb']:.0f} | {r['seconds']:.0f} | "
              f"{r['cpu_seconds']:.0f} | {r['partitions'].get('band', '-')} | {r['plan_mb']} |")


if __name__ == "__main__":
    main()
