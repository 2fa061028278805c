"""Encode throughput: `glm tokenize encode` vs the `tokenizers` library's own `encode_batch` vs `tiktoken`.

    .venv/bin/python bench/tokenize_encode.py                           # trains a tokenizer on the corpus first
    .venv/bin/python bench/tokenize_encode.py --tokenizer runs/demo/tokenizer --json

Corpus: the Shakespeare texts (data/raw/texts/*.txt, `make data`) cut into ~4 kB documents at line breaks,
written as one JSONL file. Tokenizer: --tokenizer, or a byte-level BPE of --vocab-size trained here with
`core.tokens.tokenizer.train_bpe`.

  tokenizers       `Tokenizer.encode_batch(texts)` on the texts already in memory, ids taken out of the
                   Encoding objects (`encode_batch_fast` too, which skips offsets)
  tiktoken         a `tiktoken.Encoding` built from the same tokenizer: mergeable ranks = byte-level token ids
                   (merges were learned in id order), the same GPT-2 pre-tokenization regex;
                   `encode_ordinary_batch`. Its ids are compared with the tokenizers ids, document by document.
  glm              `core.tokens.encode.encode_corpus`: read the JSONL file, split train/val by hash, encode, write
                   the uint16 shards, offsets and index (what `glm tokenize encode` does, without process
                   start-up), one worker process (tokenizers' own threads inside)

Throughput is MB of text per second, best of --repeats, all in this process on the same documents, the
variants interleaved so machine load hits all alike; CPU seconds (all threads of this process, best of
--repeats) are printed too, since they suffer less from other jobs on a shared machine. glm's overhead
is its time over raw encode_batch's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def make_corpus(directory: Path, doc_bytes: int) -> tuple[Path, list[str]]:
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
        for k, text in enumerate(docs):
            f.write(json.dumps({"id": f"doc{k}", "text": text}, ensure_ascii=False) + "\n")
    return path, docs


def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table used by byte-level BPE."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = {}, 0
    for b in range(256):
        if b in visible:
            codes[chr(b)] = b
        else:
            codes[chr(256 + extra)] = b
            extra += 1
    return codes


def tiktoken_from(tok_file: Path):
    import tiktoken

    from glm_cli.core.tokens.tokenizer import SPECIAL_TOKENS

    model = json.loads(tok_file.read_text())["model"]
    decoder = byte_decoder()
    ranks = {bytes(decoder[c] for c in token): idx for token, idx in model["vocab"].items()
             if token not in SPECIAL_TOKENS}
    return tiktoken.Encoding(name="glm-bench", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={t: i for i, t in enumerate(SPECIAL_TOKENS)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", help="tokenizer dir; default: train one here")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--doc-bytes", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from glm_cli.core.io.corpus import read_documents
    from glm_cli.core.tokens.encode import Splitter, encode_corpus
    from glm_cli.core.tokens.tokenizer import load_tokenizer, save_tokenizer_dir, tokenizer_path, train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus, docs = make_corpus(tmp, args.doc_bytes)
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        if args.tokenizer:
            tok_dir = Path(args.tokenizer)
        else:
            tok_dir = tmp / "tok"
            save_tokenizer_dir(train_bpe(iter(docs), args.vocab_size), tok_dir)
        tok_file = tokenizer_path(tok_dir)
        tok = load_tokenizer(tok_file)
        enc = tiktoken_from(tok_file)

        def raw():
            return [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]

        def raw_fast():
            return [e.ids for e in tok.encode_batch_fast(docs, add_special_tokens=False)]

        def tik():
            return enc.encode_ordinary_batch(docs)

        def glm():
            encode_corpus(read_documents([str(corpus)]), tok_dir, tmp / "shards", splitter=Splitter(0.05))

        variants = {"tokenizers encode_batch": raw, "tokenizers encode_batch_fast": raw_fast,
                    "tiktoken": tik, "glm encode": glm}
        best = {name: float("inf") for name in variants}
        cpu = {name: float("inf") for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
                cpu[name] = min(cpu[name], time.process_time() - start_cpu)
        hf_ids, tk_ids = raw(), tik()
        same = sum(a == b for a, b in zip(hf_ids, tk_ids, strict=True))
        tokens = sum(map(len, hf_ids))

    raw_time = best["tokenizers encode_batch"]
    summary = {"documents": len(docs), "mb": round(mb, 2), "tokens": tokens, "vocab_size": tok.get_vocab_size(),
               "mb_per_s": {k: round(mb / v, 2) for k, v in best.items()},
               "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
               "glm_overhead_vs_encode_batch_pct": round(100 * (best["glm encode"] / raw_time - 1), 1),
               "glm_cpu_overhead_vs_encode_batch_pct": round(
                   100 * (cpu["glm encode"] / cpu["tokenizers encode_batch"] - 1), 1),
               "tiktoken_ids_identical_docs": f"{same}/{len(docs)}"}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{len(docs)} documents, {mb:.1f} MB, {tokens:,} tokens, vocab {summary['vocab_size']}")
    for name, rate in summary["mb_per_s"].items():
        print(f"  {name:30s} {rate:7.2f} MB/s  {summary['cpu_seconds'][name]:7.2f} CPU s")
    print(f"glm overhead over tokenizers encode_batch: {summary['glm_overhead_vs_encode_batch_pct']:+.1f}% wall, "
          f"{summary['glm_cpu_overhead_vs_encode_batch_pct']:+.1f}% CPU time")
    print(f"tiktoken ids identical to tokenizers ids: {summary['tiktoken_ids_identical_docs']} documents")


if __name__ == "__main__":
    main()
