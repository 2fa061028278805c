"""tiktoken as the encoding engine of a byte-level BPE `tokenizer.json`, where it gives the same ids exactly.

Why tiktoken: it runs the same byte-level BPE as `tokenizers` about 4x faster per CPU second (a rank-ordered
merge loop over bytes in Rust, without `tokenizers`' offsets, alignments and normalized-string machinery),
it is maintained by OpenAI as the encoder of their own models, and a native encoder of ours would have to
re-implement its regex engine and merge loop to reach the same speed (see docs/dedup_tokenize.md).

How a `tokenizer.json` becomes a `tiktoken.Encoding`:

- mergeable ranks: every vocabulary token but the special ones, its byte-level characters mapped back to
  bytes, ranked by its id. tiktoken merges the adjacent pair whose concatenation has the lowest rank; that
  is `tokenizers`' rule (the pair whose merge comes first) when each merge makes a distinct token and the
  ids of merged tokens rise with the merge order, which `representable` checks;
- pat_str: the pre-tokenizer's regular expression (GPT-2's for `ByteLevel(use_regex=True)`, the `Split`
  pattern of Llama-3/Qwen2-style `Sequence[Split, ByteLevel(use_regex=False)]`, one pattern equal to
  SmolLM2's `Sequence[Digits(individual_digits=True), ByteLevel]`);
- special tokens: none are recognized in text (glm encodes special-token strings as plain text, see
  `tokenizer.encode_texts`), so `encode_ordinary` is the whole of it.

Anything else is refused, with the reason, and the caller falls back to `tokenizers`: a normalizer, another
pre-tokenizer, a prefix space, dropout, an unknown token or byte fallback, a subword prefix or suffix, added
tokens that are not special (tokenizers splits them out even when special ones are left as text), a merge
that repeats a token or ranks against the id order, a byte missing from the vocabulary, or a special token
that one pre-tokenized piece can equal. A final check runs both engines on every vocabulary token's own
text and on a sample of mixed text and requires the same ids.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

# The regular expression of `tokenizers`' ByteLevel pre-tokenizer (use_regex=True): GPT-2's.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# `Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]` (SmolLM2, StarCoder) as one pattern:
# each digit is a piece of its own, so no other piece holds a digit, and a whitespace run that ends at a
# digit ends its piece (where GPT-2's `(?!\S)` holds): that lookahead becomes "not a non-space non-digit".
DIGITS_GPT2_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

# Text both engines must encode alike before the fast one is trusted (contractions, digits, spaces
# before letters, runs of whitespace, CJK, emoji, combining marks, special-token strings as text).
_PROBE = ("Hello world! It's 2024, isn't it? 'Tis   three\t\tspaces\n\n\nand  trailing   \n"
          " don't I'LL we've  12345 6.02e23 naïve café 日本語のテキスト 🎭🎭 e\u0301 \u00a0nbsp "
          "<|endoftext|> <|pad|>x<|user|>\r\n ''' ---> ==== ....")


def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table, which byte-level BPE vocabularies are written in."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = {}, 0
    for b in range(256):
        if b in visible:
            codes[chr(b)] = b
        else:
            codes[chr(256 + extra)] = b
            extra += 1
    return codes


class NotRepresentable(Exception):
    """The tokenizer cannot be run exactly by tiktoken; the message says why."""


@dataclass(frozen=True, slots=True)
class TiktokenSpec:
    """What a `tiktoken.Encoding` is built from (picklable, so worker processes rebuild it cheaply)."""

    name: str
    pat_str: str
    ranks: dict[bytes, int]
    special: dict[str, int]

    def encoding(self):
        import tiktoken

        return tiktoken.Encoding(name=self.name, pat_str=self.pat_str, mergeable_ranks=self.ranks,
                                 special_tokens=self.special)


def _pattern(pre: dict | None) -> str:
    """The pat_str equal to a pre-tokenizer, or NotRepresentable."""
    if pre is None:
        raise NotRepresentable("no pre-tokenizer (not byte-level)")
    kind = pre.get("type")
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise NotRepresentable("ByteLevel add_prefix_space=true")
        if not pre.get("use_regex", True):
            raise NotRepresentable("ByteLevel use_regex=false without a Split before it")
        return GPT2_PATTERN
    if kind == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"):
            split, level = steps
            regex = (split.get("pattern") or {}).get("Regex")
            if regex is None:
                raise NotRepresentable("Split by a literal string, not a regex")
            if split.get("behavior") != "Isolated" or split.get("invert"):
                raise NotRepresentable(f"Split behavior {split.get('behavior')} invert={split.get('invert')}")
            if level.get("add_prefix_space") or level.get("use_regex", True):
                raise NotRepresentable("ByteLevel after Split with add_prefix_space or its own regex")
            return regex
        if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
                and steps[1].get("type") == "ByteLevel"):
            if steps[1].get("add_prefix_space") or not steps[1].get("use_regex", True):
                raise NotRepresentable("ByteLevel after Digits with add_prefix_space or without its regex")
            return DIGITS_GPT2_PATTERN
        raise NotRepresentable("pre-tokenizer sequence " + "+".join(s.get("type", "?") for s in steps))
    raise NotRepresentable(f"pre-tokenizer {kind}")


def spec_from_json(data: dict, name: str = "glm") -> TiktokenSpec:
    """The tiktoken form of a parsed `tokenizer.json`, or NotRepresentable (the structural checks)."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise NotRepresentable(f"model {model.get('type')}, not BPE")
    if data.get("normalizer") is not None:
        raise NotRepresentable(f"normalizer {data['normalizer'].get('type')}")
    pat_str = _pattern(data.get("pre_tokenizer"))
    for key, ok in (("dropout", None), ("unk_token", None), ("continuing_subword_prefix", None),
                    ("end_of_word_suffix", None)):
        if model.get(key) not in (ok, ""):
            raise NotRepresentable(f"BPE {key}={model.get(key)!r}")
    if model.get("byte_fallback") or model.get("fuse_unk"):
        raise NotRepresentable("BPE byte_fallback or fuse_unk")
    added = data.get("added_tokens") or []
    plain = [t["content"] for t in added if not t.get("special")]
    if plain:
        raise NotRepresentable(f"added tokens that are not special ({plain[0]!r}...)")
    special = {t["content"]: int(t["id"]) for t in added}
    vocab: dict[str, int] = model["vocab"]
    decode = byte_decoder()
    ranks: dict[bytes, int] = {}
    for token, idx in vocab.items():
        if token in special and special[token] == idx:
            continue
        try:
            ranks[bytes(decode[c] for c in token)] = idx
        except KeyError:
            raise NotRepresentable(f"vocabulary token {token!r} is not byte-level") from None
    if len(ranks) != len(vocab) - sum(1 for t, i in special.items() if vocab.get(t) == i):
        raise NotRepresentable("two vocabulary tokens have the same bytes")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise NotRepresentable(f"byte {missing[0]:#04x} has no token")
    # tiktoken merges by the rank of the result, tokenizers by the rank of the merge: the same order only
    # when every merge makes a new token and merged tokens' ids rise with the merge order
    previous = -1
    made: set[bytes] = set()
    for k, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        result = bytes(decode[c] for c in left + right)
        idx = ranks.get(result)
        if idx is None:
            raise NotRepresentable(f"merge {k} makes a token outside the vocabulary")
        if result in made or idx <= previous:
            raise NotRepresentable(f"merge {k} ({left} {right}) is out of id order or repeats a token")
        made.add(result)
        previous = idx
    return TiktokenSpec(name=name, pat_str=pat_str, ranks=ranks, special=special)


def _verify(spec: TiktokenSpec, tok) -> None:
    """Both engines agree on every vocabulary token's own text and on mixed text, or NotRepresentable.

    Every token's text is where rank order and merge order could part (a token reachable by merges in
    another order, `ignore_merges` letting a whole piece through), and the probe text exercises the
    pre-tokenizer; `tests/tokens/test_fast_encode.py` adds random Unicode and real corpora."""
    enc = spec.encoding()
    texts = [bytes_.decode("utf-8", "replace") for bytes_ in spec.ranks]
    texts = [t for t in texts if "\ufffd" not in t] + [_PROBE]
    texts += [s for s in spec.special]
    tok.encode_special_tokens = True
    try:
        want = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = False
    got = enc.encode_ordinary_batch(texts, num_threads=1)
    for text, a, b in zip(texts, want, got, strict=True):
        if a != b:
            raise NotRepresentable(f"the engines differ on {text[:40]!r}: {a[:8]} vs {b[:8]}")


def file_key(path: str) -> tuple[str, int, int]:
    """What a cache of a tokenizer file is keyed by: its path, modification time and size, so a file
    rewritten in place (a retrained tokenizer) is read again."""
    stat = os.stat(path)
    return str(path), stat.st_mtime_ns, stat.st_size


def tiktoken_spec(tok_file: str) -> TiktokenSpec | NotRepresentable:
    """The verified tiktoken form of a tokenizer.json, or the reason it has none (cached per file version).

    A missing `tiktoken` package is a reason too: it is an optional speed-up, `tokenizers` is the reference."""
    return _tiktoken_spec(file_key(tok_file))


@functools.lru_cache(maxsize=4)
def _tiktoken_spec(key: tuple[str, int, int]) -> TiktokenSpec | NotRepresentable:
    tok_file = key[0]
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return NotRepresentable("tiktoken is not installed (pip install tiktoken)")
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    try:
        spec = spec_from_json(json.loads(Path(tok_file).read_text(encoding="utf-8")), Path(tok_file).parent.name)
        _verify(spec, load_tokenizer(tok_file))
    except NotRepresentable as reason:
        return reason
    return spec
