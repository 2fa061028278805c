"""The data commands on 100 MB and more: `glm dedup`, `glm clean`, `glm tokenize encode` against their peers.

    nice .venv/bin/python bench/data_scale.py --mb 100                  # generates bench/data/data_scale/ once
    nice .venv/bin/python bench/data_scale.py --mb 100,300 --only dedup --repeats 1
    # worker scaling and peak RSS of `glm dedup run` only (no peers), inputs kept outside the repository:
    nice .venv/bin/python bench/data_scale.py --mb 100,1000 --only dedup --repeats 2 --data-dir /work/bigdata \
        --skip datasketch,near
    nice .venv/bin/python bench/data_scale.py --mb 1000,5000 --data-dir /work/bigdata --make-only  # inputs only

Input: --mb megabytes of JSONL made from the Shakespeare corpus (data/raw/texts, `make data`). Up to
100 MB, generated word by word: all words of all texts, shuffled in runs of 5-40 lines and re-cut into
documents of 200-1500 words, each with a random 0-5 % of its words edited; 10 % of the documents are
edited copies (0-10 % of words) of an earlier one, so there are near duplicates at every similarity
(~13 s for 100 MB). Past 100 MB, grown from the 100 MB input (`grow_corpus`, ~30 s a GB where generating
word by word took minutes on a loaded machine): the 100 MB input, then copies of it, each re-cut into
new documents of the same make (paragraphs shuffled among 64 neighbouring documents, 0-5 % of words
replaced, 10 % near copies of a recent document with 0-10 % replaced, new ids). Not committed
(bench/data/ is ignored; --data-dir puts inputs and outputs elsewhere).

Every row runs as its own process on the same file, rows alternating (repeats interleave), so machine
load hits all alike. Measured: wall seconds and CPU seconds (user + system of the process and its
children, from `wait4`), peak RSS (of the largest single process), MB/s of input and CPU seconds per GB.
Rows:

  dedup   `glm dedup run IN -o OUT` (all defaults: exact, near, lines; --workers 1 and 2; --memory-mb 256; near
          duplicates only, --no-exact --no-lines, the work datasketch's loop does) against
          datasketch: read the JSONL, word 5-gram shingles (glm's normalization, in Python), `MinHash`
          (128 permutations) `update_batch`, `MinHashLSH(threshold=0.8)` insert + query, candidates
          verified by `MinHash.jaccard`, union-find, write the kept documents: one process.
  clean   `glm clean IN -o OUT` (all defaults) --workers 1 and 2 against datatrove: read JSONL ->
          GopherRepetitionFilter -> GopherQualityFilter -> write JSONL on a LocalPipelineExecutor with
          1 and 2 tasks (glm does more: HTML, normalization, boilerplate, C4, language id, PII).
          With 2 tasks datatrove's pool processes are not waited for by its process, so their CPU
          time is missing from the CPU column (compare wall time there).
  encode  `glm tokenize encode IN -t TOK -o DIR` --workers 1 and 2 against the `tokenizers` library:
          read the JSONL, `encode_batch` in batches of 256 (RAYON_NUM_THREADS 1 and 2), write the ids
          as uint16. TOK: a byte-level BPE of vocabulary 8192 trained by `glm tokenize train` on 20 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench/data/data_scale"
PY = sys.executable


BASE_MB = 100  # larger inputs are grown from the 100 MB corpus (`grow_corpus`)


def make_corpus(mb: int, seed: int, data: Path | None = None) -> Path:
    """The --mb input under `data`: generated word by word up to 100 MB, grown from the 100 MB one past it."""
    data = data or DATA
    out = data / f"docs-{mb}mb-s{seed}.jsonl"
    if out.exists():
        return out
    if mb > BASE_MB:
        return grow_corpus(make_corpus(BASE_MB, seed, data), out, mb, seed)
    files = sorted((ROOT / "data/raw/texts").glob("*.txt"))
    if not files:
        raise SystemExit("no data/raw/texts/*.txt: run `make data` first")
    rng = random.Random(seed)
    lines = [ln for f in files for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    vocab = " ".join(lines[:200000]).split()
    runs = []
    i = 0
    while i < len(lines):
        n = rng.randint(5, 40)
        runs.append(lines[i:i + n])
        i += n

    def edited(ws: list[str], rate: float) -> list[str]:
        out = []
        for w in ws:
            r = rng.random()
            if r < rate / 3:
                continue
            out.append(rng.choice(vocab) if r < 2 * rate / 3 else w)
            if 2 * rate / 3 <= r < rate:
                out.append(rng.choice(vocab))
        return out

    data.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    written, k, docs = 0, 0, []
    with open(tmp, "w", encoding="utf-8") as f:
        while written < mb * 1_000_000:
            if docs and rng.random() < 0.1:
                text = " ".join(edited(rng.choice(docs).split(), rng.uniform(0, 0.1)))
            else:
                target, body = rng.randint(200, 1500), []
                while sum(len(b.split()) for b in body) < target:
                    body.append("\n".join(" ".join(edited(ln.split(), rng.uniform(0, 0.05)))
                                          for ln in rng.choice(runs)))
                text = "\n\n".join(body)
                docs = (docs + [text])[-2000:]
            written += _write_doc(f, k, text)
            k += 1
    tmp.rename(out)
    return out


def _write_doc(f, k: int, text: str) -> int:
    """One document as a JSONL line; returns its size in bytes (the generators stop at a size)."""
    line = json.dumps({"id": f"doc{k}", "text": text}) + "\n"
    f.write(line)
    return len(line.encode("utf-8"))


def _substituted(words: list[str], rate: float, rng, vocab: list[str]) -> str:
    """`words` joined by spaces with a `rate` share of them replaced by vocabulary words (numpy picks
    which and by what; only the replaced words cost a Python step)."""
    k = int(rng.binomial(len(words), rate))
    if k:
        for at, word in zip(rng.integers(0, len(words), k).tolist(), rng.integers(0, len(vocab), k).tolist(),
                            strict=True):
            words[at] = vocab[word]
    return " ".join(words)


def grow_corpus(base: Path, out: Path, mb: int, seed: int) -> Path:
    """An input of `mb` MB from the 100 MB one: the base itself, then copies of it, each copy re-cut so
    that its documents are new ones of the same make (seconds a GB where generating word by word took
    minutes). Copy c: the paragraphs (runs of edited Shakespeare lines) of every 64 consecutive base
    documents are shuffled among those documents (each keeps its number of paragraphs, so the lengths
    stay those of the base), then 0-5 % of each document's words are replaced by vocabulary words, and
    10 % of the documents are replaced by a copy of one of the previous 2,000 with 0-10 % of its words
    replaced: distinct documents with near duplicates at every similarity, as in the base, and new ids
    (doc{k} counting on). Paragraphs recur across copies (as runs recur within the base), so line
    counts for boilerplate grow with the input as they would in a crawl."""
    import numpy as np

    texts = [json.loads(line)["text"] for line in open(base, encoding="utf-8")]
    paragraphs = [t.split("\n\n") for t in texts]
    vocab = sorted({w for t in texts[:2000] for w in t.split()})
    tmp = out.with_suffix(".tmp")
    shutil.copyfile(base, tmp)
    written, k, copy = base.stat().st_size, len(texts), 0
    with open(tmp, "a", encoding="utf-8") as f:
        while written < mb * 1_000_000:
            copy += 1
            rng = np.random.default_rng([seed, copy])
            recent: list[str] = []
            for lo in range(0, len(texts), 64):
                block = paragraphs[lo:lo + 64]
                pool = [p for doc in block for p in doc]
                order = rng.permutation(len(pool)).tolist()
                at = 0
                for doc in block:
                    if written >= mb * 1_000_000:
                        break
                    if recent and rng.random() < 0.1:
                        source = recent[int(rng.integers(0, len(recent)))]
                        text = _substituted(source.split(" "), rng.uniform(0, 0.1), rng, vocab)
                    else:
                        text = "\n\n".join(pool[j] for j in order[at:at + len(doc)])
                        text = _substituted(text.split(" "), rng.uniform(0, 0.05), rng, vocab)
                        recent.append(text)
                        if len(recent) > 2000:
                            del recent[0]
                    at += len(doc)
                    written += _write_doc(f, k, text)
                    k += 1
    tmp.rename(out)
    return out


def datasketch_dedup(inp: str, out: str) -> None:
    """The peer loop (run as `data_scale.py _datasketch IN OUT`)."""
    from datasketch import MinHash, MinHashLSH

    from glm_cli.core.dedup import minhash

    records = [json.loads(line) for line in open(inp, encoding="utf-8")]
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    sketches = []
    for i, r in enumerate(records):
        w = minhash.normalize(r["text"]).split()
        m = MinHash(num_perm=128)
        m.update_batch([" ".join(w[j:j + 5]).encode("utf-8") for j in range(max(len(w) - 4, 1))])
        lsh.insert(i, m)
        sketches.append(m)
    parent = list(range(len(records)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in enumerate(sketches):
        for j in lsh.query(m):
            if j > i and m.jaccard(sketches[j]) >= 0.8:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    with open(out, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            if find(i) == i:
                f.write(json.dumps(r) + "\n")


def datatrove_clean(inp: str, out: str, tasks: int) -> None:
    """datatrove's Gopher filters on a LocalPipelineExecutor; reading and writing JSONL are plain
    callables (its JsonlReader/Writer need orjson, not installed here), each task taking every
    tasks-th line."""
    from datatrove.data import Document as DTDocument
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    def read(data, rank: int = 0, world_size: int = 1):
        with open(inp, encoding="utf-8") as f:
            for k, line in enumerate(f):
                if k % world_size == rank:
                    r = json.loads(line)
                    yield DTDocument(text=r["text"], id=r["id"])

    def write(data, rank: int = 0, world_size: int = 1):
        with open(f"{out}/{rank:05d}.jsonl", "w", encoding="utf-8") as f:
            for doc in data:
                f.write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
        return iter(())

    Path(out).mkdir(parents=True, exist_ok=True)
    LocalPipelineExecutor(pipeline=[read, GopherRepetitionFilter(), GopherQualityFilter(), write],
                          tasks=tasks, workers=tasks, logging_dir=f"{out}/logs").run()


def tokenizers_encode(inp: str, tok: str, out: str) -> None:
    import numpy as np
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(f"{tok}/tokenizer.json")
    with open(inp, encoding="utf-8") as f, open(out, "wb") as w:
        batch = []
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 256:
                for e in t.encode_batch(batch):
                    np.asarray(e.ids, dtype=np.uint16).tofile(w)
                batch = []
        for e in t.encode_batch(batch):
            np.asarray(e.ids, dtype=np.uint16).tofile(w)


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of a command: CPU of it and its children (`wait4` counts the children
    it waited for, so a pool's workers are in), peak RSS of its largest single process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd[:6])} ...: {err.read().decode()[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def rows_for(only: set[str], inp: Path, work: Path, tok: Path) -> dict[str, tuple[list[str], dict]]:
    glm = [PY, "-m", "glm_cli"]
    me = [PY, str(Path(__file__).resolve())]
    rows: dict[str, tuple[list[str], dict]] = {}
    if "dedup" in only:
        for w in (1, 2):
            rows[f"dedup: glm, {w} worker(s)"] = (
                [*glm, "dedup", "run", str(inp), "-o", str(work / "dedup.jsonl"), "--workers", str(w), "-q"], {})
        rows["dedup: glm, 1 worker, --memory-mb 256"] = (
            [*glm, "dedup", "run", str(inp), "-o", str(work / "dedup.jsonl"), "--memory-mb", "256", "-q"], {})
        rows["dedup: glm near only (--no-exact --no-lines), 1 worker"] = (
            [*glm, "dedup", "run", str(inp), "-o", str(work / "dedup.jsonl"), "--no-exact", "--no-lines", "-q"], {})
        rows["dedup: datasketch"] = ([*me, "_datasketch", str(inp), str(work / "ds.jsonl")], {})
    if "clean" in only:
        for w in (1, 2):
            rows[f"clean: glm, {w} worker(s)"] = (
                [*glm, "clean", str(inp), "-o", str(work / "clean.jsonl"), "--workers", str(w), "-q"], {})
            rows[f"clean: datatrove, {w} task(s)"] = ([*me, "_datatrove", str(inp), str(work / f"dt{w}"), str(w)], {})
    if "encode" in only:
        for w in (1, 2):
            rows[f"encode: glm, {w} worker(s)"] = (
                [*glm, "tokenize", "encode", str(inp), "-t", str(tok), "-o", str(work / f"shards{w}"),
                 "--workers", str(w), "-q"], {"RAYON_NUM_THREADS": str(w)})
            rows[f"encode: tokenizers, {w} thread(s)"] = (
                [*me, "_tokenizers", str(inp), str(tok), str(work / "ids.bin")], {"RAYON_NUM_THREADS": str(w)})
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        what, *args = sys.argv[1:]
        {"_datasketch": datasketch_dedup, "_tokenizers": tokenizers_encode,
         "_datatrove": lambda i, o, t: datatrove_clean(i, o, int(t))}[what](*args)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", default="100", help="input sizes in MB, comma-separated")
    ap.add_argument("--only", default="dedup,clean,encode")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=str(DATA),
                    help="where the inputs are made (once) and the rows write their outputs")
    ap.add_argument("--skip", default="", help="comma-separated parts of row names to leave out, e.g. "
                    "'datasketch,near only'")
    ap.add_argument("--make-only", action="store_true", help="make the inputs and stop")
    ap.add_argument("--json-out", default=str(ROOT / "bench/results/data_scale.json"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    results = []
    data = Path(args.data_dir)
    skip = [part for part in args.skip.split(",") if part]
    tok = data / "tok8192"
    for mb in (int(m) for m in args.mb.split(",")):
        inp = make_corpus(mb, args.seed, data)
        if args.make_only:
            print(f"{inp}: {inp.stat().st_size / 1e6:.1f} MB", file=sys.stderr)
            continue
        size = inp.stat().st_size
        if "encode" in only and not (tok / "tokenizer.json").exists():
            sample = make_corpus(20, args.seed, data)
            subprocess.run([PY, "-m", "glm_cli", "tokenize", "train", str(sample), "-o", str(tok),
                            "--vocab-size", "8192", "-q"], check=True)
        work = data / f"work-{mb}"
        rows = {name: row for name, row in rows_for(only, inp, work, tok).items()
                if not any(part in name for part in skip)}
        best: dict[str, list[float]] = {}
        load = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name, (cmd, env) in rows.items():  # alternating
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                wall, cpu, rss = timed(cmd, env)
                old = best.get(name, [float("inf"), float("inf"), float("inf")])
                best[name] = [min(old[0], wall), min(old[1], cpu), min(old[2], rss)]
                print(f"{mb} MB  {name}: {wall:.1f} s wall, {cpu:.1f} CPU s, {rss:.0f} MB peak RSS", file=sys.stderr,
                      flush=True)
        shutil.rmtree(work, ignore_errors=True)
        for name, (wall, cpu, rss) in best.items():
            results.append({"mb": round(size / 1e6, 1), "row": name, "seconds": round(wall, 2),
                            "cpu_seconds": round(cpu, 2), "peak_rss_mb": round(rss), "load_average": round(load, 1),
                            "mb_per_s": round(size / 1e6 / wall, 2),
                            "cpu_s_per_gb": round(cpu / (size / 1e9), 1)})
    if args.make_only:
        return
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    print("| input | row | wall s | CPU s | peak RSS MB | MB/s | CPU s per GB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mb']} MB | {r['row']} | {r['seconds']} | {r['cpu_seconds']} | {r['peak_rss_mb']} | "
              f"{r['mb_per_s']} | {r['cpu_s_per_gb']} |")


if __name__ == "__main__":
    main()
