"""Encode throughput: `glm tokenize encode` vs `tokenizers` `encode_batch` vs `tiktoken`, 1 and 2 workers.

    .venv/bin/python bench/tokenize_encode.py                    # ~100 MB: the corpus repeated 10 times
    .venv/bin/python bench/tokenize_encode.py --copies 1 --json  # ~10 MB

Corpus: the Shakespeare texts (data/raw/texts/*.txt, `make data`) cut into ~4 kB documents at line breaks,
repeated --copies times, written as one JSONL file. Tokenizer: --tokenizer, or a byte-level BPE of
--vocab-size trained here on one copy with `core.tokens.tokenizer.train_bpe`.

  tokenizers   `Tokenizer.encode_batch(texts, add_special_tokens=False)` on texts already in memory, special
               tokens as text (what glm did before tiktoken); its rayon pool limited to N threads
  tiktoken     `Encoding.encode_ordinary_batch(texts, num_threads=N)` on texts in memory, the Encoding built
               by `core.tokens.fast_encode` from the same tokenizer.json (the same merges)
  glm          `core.tokens.encode.encode_corpus(workers=N)`: read the JSONL file, encode (tiktoken, which
               it chooses for this tokenizer), write the shards and index: `glm tokenize encode` without
               process start-up

Each variant runs in a fresh child process (thread pools cannot be resized inside one), the variants
interleaved --repeats times; wall is the best, CPU seconds (user+sys of the child and its workers) the
least. Every variant digests its ids (each document's ids then end-of-text, as uint32): all must agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def make_corpus(directory: Path, doc_bytes: int, copies: int) -> Path:
    files = sorted((ROOT / "data/raw/texts").glob("*.txt"))
    if not files:
        raise SystemExit("no data/raw/texts: run `make data` first")
    docs, current, size = [], [], 0
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines(keepends=True):
            current.append(line)
            size += len(line)
            if size >= doc_bytes:
                docs.append("".join(current))
                current, size = [], 0
    if current:
        docs.append("".join(current))
    path = directory / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for c in range(copies):
            for k, text in enumerate(docs):
                f.write(json.dumps({"id": f"c{c}-doc{k}", "text": text}, ensure_ascii=False) + "\n")
    return path


def _digest(ids_per_doc, eot: int) -> str:
    h = hashlib.sha256()
    for ids in ids_per_doc:
        h.update(np.asarray(list(ids) + [eot], dtype=np.uint32).tobytes())
    return h.hexdigest()


def child(variant: str, workers: int, corpus: Path, tok_dir: Path, out: Path) -> dict:
    """One measurement, in this (fresh) process: returns wall, CPU and the ids digest."""
    from glm_cli.core.tokens.tokenizer import load_tokenizer, tokenizer_path

    tok_file = str(tokenizer_path(tok_dir))
    eot = 0
    texts = None
    if variant != "glm":
        texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    if variant == "tokenizers":
        tok = load_tokenizer(tok_file)
        tok.encode_special_tokens = True
        ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    elif variant == "tiktoken":
        from glm_cli.core.tokens.fast_encode import tiktoken_spec

        enc = tiktoken_spec(tok_file).encoding()
        ids = enc.encode_ordinary_batch(texts, num_threads=workers)
    else:
        from glm_cli.core.io.corpus import read_documents
        from glm_cli.core.tokens.encode import Splitter, encode_corpus

        encode_corpus(read_documents([str(corpus)]), tok_dir, out, splitter=Splitter(0.0), workers=workers)
    wall = time.perf_counter() - start
    self_, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = self_.ru_utime + self_.ru_stime - cpu0 + kids.ru_utime + kids.ru_stime
    if variant == "glm":
        from glm_cli.core.tokens.encode import iter_documents

        ids = (doc.tolist() for _, doc in iter_documents(out, "train"))
    return {"wall": wall, "cpu": cpu, "digest": _digest(ids, eot),
            "peak_rss_mb": self_.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", help="tokenizer dir; default: train one here")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--doc-bytes", type=int, default=4000)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=5, metavar=("VARIANT", "WORKERS", "CORPUS", "TOKENIZER", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        variant, workers, corpus, tok_dir, out = args.child
        print(json.dumps(child(variant, int(workers), Path(corpus), Path(tok_dir), Path(out))))
        return

    from glm_cli.core.tokens.tokenizer import save_tokenizer_dir, train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = make_corpus(tmp, args.doc_bytes, args.copies)
        mb = corpus.stat().st_size / 1e6
        if args.tokenizer:
            tok_dir = Path(args.tokenizer)
        else:
            tok_dir = tmp / "tok"
            (tmp / "one").mkdir()
            one = make_corpus(tmp / "one", args.doc_bytes, 1)
            texts = (json.loads(line)["text"] for line in open(one, encoding="utf-8"))
            save_tokenizer_dir(train_bpe(texts, args.vocab_size), tok_dir)
        results: dict[str, dict] = {}
        for _ in range(args.repeats):
            for variant in ("tokenizers", "tiktoken", "glm"):
                for workers in (1, 2):
                    name = f"{variant} x{workers}"
                    out = tmp / f"out-{variant}-{workers}"
                    out.mkdir(exist_ok=True)
                    env = {**os.environ, "RAYON_NUM_THREADS": str(workers), "TOKENIZERS_PARALLELISM": "true"}
                    proc = subprocess.run([sys.executable, __file__, "--child", variant, str(workers), str(corpus),
                                           str(tok_dir), str(out)], env=env, capture_output=True, text=True)
                    if proc.returncode:
                        raise SystemExit(f"{name} failed:\n{proc.stderr}")
                    got = json.loads(proc.stdout.strip().splitlines()[-1])
                    best = results.setdefault(name, got)
                    best["wall"], best["cpu"] = min(best["wall"], got["wall"]), min(best["cpu"], got["cpu"])
    digests = {r["digest"] for r in results.values()}
    summary = {"mb": round(mb, 1), "copies": args.copies, "vocab_size": args.vocab_size,
               "ids_identical": len(digests) == 1, "load_average": os.getloadavg()[0],
               "variants": {k: {"wall_s": round(v["wall"], 2), "cpu_s": round(v["cpu"], 2),
                                "mb_per_cpu_s": round(mb / v["cpu"], 2)} for k, v in results.items()}}
    for v in ("tokenizers", "tiktoken", "glm"):
        summary[f"{v}_2_workers_speedup"] = round(results[f"{v} x1"]["wall"] / results[f"{v} x2"]["wall"], 2)
    summary["glm_cpu_vs_tiktoken_x1"] = round(results["glm x1"]["cpu"] / results["tiktoken x1"]["cpu"], 2)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{mb:.1f} MB JSONL, vocab {args.vocab_size}, load average {summary['load_average']:.1f}")
    for name, row in summary["variants"].items():
        print(f"  {name:16s} {row['wall_s']:8.2f} s wall {row['cpu_s']:8.2f} CPU s  {row['mb_per_cpu_s']:6.2f} MB/CPU s")
    print(f"ids identical across all variants: {summary['ids_identical']}")
    print(f"glm CPU / tiktoken CPU (1 worker): {summary['glm_cpu_vs_tiktoken_x1']}")
    if len(digests) != 1:
        raise SystemExit("ids differ between variants")


if __name__ == "__main__":
    main()
