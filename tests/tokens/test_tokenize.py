"""glm tokenize: BPE training, round trip, shards (split, dtype, offsets, bytes), sharded runs, refusals."""

import json
import random

import numpy as np
import pytest
from conftest import read_jsonl, run_glm, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm_cli.core.errors import GlmError, UsageError
from glm_cli.core.io.corpus import Document
from glm_cli.core.io.shards import ShardIndex, ShardSet, is_shard_dir
from glm_cli.core.tokens.encode import Splitter, encode_corpus
from glm_cli.core.tokens.tokenizer import (
    SPECIAL_TOKENS,
    decode_ids,
    encode_texts,
    load_tokenizer,
    save_tokenizer_dir,
    tokenizer_sha256,
    train_bpe,
)

PLAYS = ["hamlet", "macbeth", "othello", "lear", "tempest", "cymbeline", "pericles", "coriolanus"]


def glm(*args) -> bytes:
    """Run a glm command in this process (faster than a subprocess); returns its stdout."""
    from typer.testing import CliRunner

    from glm_cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout_bytes


def _text(rng: random.Random, n: int) -> str:
    words = ["thou", "art", "the", "king", "of", "Denmark", "wherefore", "lord", "sweet", "night", "é", "naïve",
             "—", "“quoted”", "日本", "🎭", "\n", "\n\n", "  ", "42", "<|endoftext|>"]
    return " ".join(rng.choice(words) for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Both 'editions' of 8 plays, ids like hamlet_gut and hamlet_gut_f, as in the demo corpus."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("tok")
    records = []
    for play in PLAYS:
        records.append({"id": f"{play}_gut", "text": _text(rng, 300)})
        records.append({"id": f"{play}_gut_f", "text": _text(rng, 300)})
    path = write_jsonl(root / "corpus.jsonl", records)
    tok_dir = root / "tok"
    glm("tokenize", "train", path, "-o", tok_dir, "--vocab-size", "400")
    return path, records, tok_dir


# --------------------------------------------------------------------------------------- tokenizer


def test_trained_tokenizer_layout_and_loaders(corpus, tmp_path):
    path, _, tok_dir = corpus
    assert (tok_dir / "tokenizer.json").exists() and (tok_dir / "tokenizer_config.json").exists()
    tok = load_tokenizer(tok_dir)
    assert 262 < tok.get_vocab_size() <= 400  # a tiny corpus runs out of merges before 400
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(6))

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    text = "Wherefore art thou, sweet lord? 🎭"
    assert hf.encode(text) == tok.encode(text).ids  # no BOS/EOS added behind our back
    assert hf.decode(hf.encode(text)) == text
    assert (hf.eos_token_id, hf.pad_token_id) == (0, 1)
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>\nhi<|end|>\n<|assistant|>\n"

    # training is deterministic: same corpus and settings, same file
    glm("tokenize", "train", path, "-o", tmp_path / "again", "--vocab-size", "400")
    assert tokenizer_sha256(tmp_path / "again") == tokenizer_sha256(tok_dir)


@pytest.fixture(scope="module")
def small_tokenizer(corpus):
    return load_tokenizer(corpus[2])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_round_trip_any_unicode(small_tokenizer, text):
    ids = encode_texts(small_tokenizer, [text])[0]
    assert decode_ids(small_tokenizer, ids) == text
    assert 0 not in ids  # the end-of-text id never comes from text, even "<|endoftext|>" itself


def test_special_token_strings_in_text_are_plain_text(small_tokenizer):
    text = "a <|endoftext|> b <|user|>"
    ids = encode_texts(small_tokenizer, [text])[0]
    assert not set(ids) & set(range(6)) and decode_ids(small_tokenizer, ids) == text


def test_train_sample_and_held_out_split(corpus, tmp_path):
    path, _, _ = corpus
    out = json.loads(glm("tokenize", "train", path, "-o", tmp_path / "t", "--vocab-size", "300", "--sample", "5",
                         "--json"))
    assert out["documents"] == 5 and out["vocab_size"] == 300
    out = json.loads(glm("tokenize", "train", path, "-o", tmp_path / "t", "--vocab-size", "300", "--val-fraction",
                         "0.3", "--group-pattern", "^(.*?)_gut", "--json"))
    assert out["held_out"] % 2 == 0 and out["held_out"] > 0 and out["documents"] + out["held_out"] == 16
    with pytest.raises(GlmError):
        train_bpe(iter(["x"]), 100)


# ------------------------------------------------------------------------------------------ encode


def test_encode_writes_documented_shards(corpus, tmp_path):
    path, records, tok_dir = corpus
    shards = tmp_path / "shards"
    summary = json.loads(glm("tokenize", "encode", path, "-t", tok_dir, "-o", shards, "--val-fraction", "0.25",
                             "--group-pattern", "^(.*?)_gut", "--shard-tokens", "700", "--json"))
    index = ShardIndex.load(shards)
    assert index.dtype == "<u2" and index.eot_token_id == 0 and index.tokenizer_sha256 == tokenizer_sha256(tok_dir)
    splitter = Splitter(0.25, "^(.*?)_gut")
    assert splitter.key("hamlet_gut_f") == "hamlet" and splitter.key("no-match") == "no-match"
    expected = {s: [r for r in records if splitter.split(r["id"]) == s] for s in ("train", "val")}
    assert expected["val"] and expected["train"]
    for r in records:  # both editions of a play are on the same side
        assert splitter.split(r["id"]) == splitter.split(r["id"].removesuffix("_f"))
    tok = load_tokenizer(tok_dir)
    for split, docs in expected.items():
        data = ShardSet(shards, split, tokenizer_sha256(tok_dir))
        assert len(data) > 1  # --shard-tokens closed several files
        assert data.total_documents == len(docs) == summary["splits"][split]["documents"]
        assert data.total_bytes == sum(len(r["text"].encode()) for r in docs)
        stream = np.concatenate([np.asarray(a) for a in data.arrays])
        assert stream.dtype == np.uint16 and stream[-1] == 0
        assert (stream == 0).sum() == len(docs)  # exactly one end-of-text per document, after it
        decoded = [decode_ids(tok, ids[:-1]) for ids in np.split(stream, np.flatnonzero(stream == 0) + 1)[:-1]]
        assert decoded == [r["text"] for r in docs]
        for k in range(len(data)):  # offsets point at document starts
            offsets = data.doc_offsets(k)
            assert offsets[0] == 0 and np.all(np.asarray(data.arrays[k])[offsets[1:] - 1] == 0)
    # decode and stats read the same directory
    val = read_jsonl(glm("tokenize", "decode", shards, "-t", tok_dir, "--split", "val"))
    assert [d["text"] for d in val] == [r["text"] for r in expected["val"]]
    text = glm("tokenize", "decode", shards, "-t", tok_dir, "--split", "val", "--limit", "1", "--text").decode()
    assert text == expected["val"][0]["text"] + "\n"
    stats = json.loads(glm("tokenize", "stats", shards, "--json"))
    assert stats["splits"]["train"]["tokens"] == summary["splits"]["train"]["tokens"]
    assert stats["splits"]["train"]["bytes_per_token"] > 1
    assert "bytes/token" in glm("tokenize", "stats", shards).decode()


def test_encode_parallel_equals_serial_and_uint32_vocab(corpus, tmp_path):
    path, records, tok_dir = corpus
    docs = [Document(id=r["id"], text=r["text"]) for r in records]
    for workers in (1, 2):
        encode_corpus(docs, tok_dir, tmp_path / f"w{workers}", splitter=Splitter(0.2), workers=workers, batch_size=3)
    for name in ("train-000000.bin", "val-000000.bin"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()

    # a vocabulary past 65536 needs uint32 tokens
    big = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = big["model"]["vocab"]
    for k in range(70000 - len(vocab)):
        vocab[f"~extra{k}"] = len(vocab)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "tokenizer.json").write_text(json.dumps(big))
    encode_corpus(docs[:2], tmp_path / "big", tmp_path / "big-shards", splitter=Splitter())
    data = ShardSet(tmp_path / "big-shards", "train")
    assert data.index.dtype == "<u4" and data.arrays[0].dtype == np.uint32
    assert (tmp_path / "big-shards" / "train-000000.bin").stat().st_size == 4 * data.total_tokens


def test_sharded_encode_equals_single_run(corpus, tmp_path):
    path, records, tok_dir = corpus
    for k in range(4):
        write_jsonl(tmp_path / f"part{k}.jsonl", records[4 * k:4 * k + 4])
    inputs = str(tmp_path / "part*.jsonl")
    common = ["-t", tok_dir, "--val-fraction", "0.25", "--group-pattern", "^(.*?)_gut", "--shard-tokens", "500"]
    glm("tokenize", "encode", inputs, "-o", tmp_path / "single", *common)
    for i in range(2):
        glm("tokenize", "encode", inputs, "-o", tmp_path / "sharded", "--shard", f"{i}/2", *common)
    assert is_shard_dir(tmp_path / "sharded") and not (tmp_path / "sharded" / "index.json").exists()
    for split in ("train", "val"):
        a, b = ShardSet(tmp_path / "single", split), ShardSet(tmp_path / "sharded", split)
        assert np.array_equal(np.concatenate(a.arrays), np.concatenate(b.arrays))
        assert (a.total_documents, a.total_bytes) == (b.total_documents, b.total_bytes)
    # an unsharded run cannot go into a sharded directory, and an incomplete one is refused
    with pytest.raises(UsageError):
        glm("tokenize", "encode", inputs, "-o", tmp_path / "single", "--shard", "0/2", *common)
    glm("tokenize", "encode", inputs, "-o", tmp_path / "partial", "--shard", "1/3", *common)
    with pytest.raises(GlmError, match="0/3"):
        ShardSet(tmp_path / "partial")


def test_tokenizer_hash_is_enforced(corpus, tmp_path):
    path, _, tok_dir = corpus
    glm("tokenize", "encode", path, "-t", tok_dir, "-o", tmp_path / "shards")
    other = tmp_path / "other"
    tok = train_bpe(iter(["something else entirely"] * 3), 300)
    save_tokenizer_dir(tok, other)
    with pytest.raises(UsageError, match="another tokenizer"):
        ShardSet(tmp_path / "shards", "train", tokenizer_sha256(other))
    proc = run_glm("tokenize", "decode", tmp_path / "shards", "-t", other)
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr.decode()
    with pytest.raises(UsageError, match="another tokenizer"):
        glm("tokenize", "stats", tmp_path / "shards", "-t", other)


def test_bad_input_and_usage_errors(corpus, tmp_path):
    path, _, tok_dir = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + "{broken\n")
    proc = run_glm("tokenize", "encode", bad, "-t", tok_dir, "-o", tmp_path / "s")
    assert proc.returncode == 1 and "bad.jsonl:17" in proc.stderr.decode() and not (tmp_path / "s").exists()
    summary = json.loads(glm("tokenize", "encode", bad, "-t", tok_dir, "-o", tmp_path / "s", "--on-error", "skip",
                             "--json"))
    assert summary["errors"]["bad_records"] == 1 and summary["splits"]["train"]["documents"] == 16
    # the CLI boundary: one line, the right exit status, no traceback
    for args, code, words in [
        (["encode", path, "-t", tok_dir, "-o", tmp_path / "s", "--group-pattern", "(("], 2, "group-pattern"),
        (["decode", "-", "-t", tok_dir], 1, "outside the vocabulary"),
    ]:
        proc = run_glm("tokenize", *args, input="1 2 99999")
        err = proc.stderr.decode()
        assert proc.returncode == code and words in err and "Traceback" not in err, (args, err)
    # the rest in process: the exception type decides the exit status (UsageError 2, GlmError 1)
    for args, error, words in [
        (["encode", path, "-t", tmp_path / "nope", "-o", tmp_path / "s"], GlmError, "nope"),
        (["encode", path, "-t", tok_dir, "-o", tmp_path / "s", "--val-fraction", "1.5"], UsageError, "val-fraction"),
        (["encode", path, "-o", tmp_path / "s"], UsageError, "--tokenizer"),
        (["encode", path, "-t", tok_dir, "-o", tok_dir], UsageError, "not a shard directory"),
        (["train", path, "-o", tmp_path / "t", "--vocab-size", "100"], GlmError, "vocab-size"),
        (["stats", tmp_path / "missing"], GlmError, "glm tokenize encode"),
        (["decode", tmp_path / "ids.txt", "-t", tok_dir], GlmError, "no such file"),
    ]:
        with pytest.raises(error, match=words):
            glm("tokenize", *args)


def test_decode_ids_from_stdin_and_file(corpus, tmp_path):
    _, _, tok_dir = corpus
    tok = load_tokenizer(tok_dir)
    ids = encode_texts(tok, ["Wherefore art thou"])[0]
    proc = run_glm("tokenize", "decode", "-", "-t", tok_dir, input=" ".join(map(str, ids)), check=True)
    assert proc.stdout.decode() == "Wherefore art thou\n"
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    glm("tokenize", "decode", tmp_path / "ids.json", "-t", tok_dir, "-o", tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_text() == "Wherefore art thou"


def test_group_map_joins_groups_a_pattern_cannot(tmp_path):
    """Two editions spelt differently share a split once the map names them one group."""
    import json

    from glm_cli.core.tokens.encode import Splitter, load_group_map

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"loves_labour_lost": "loves_labours_lost"}))
    splitter = Splitter(0.5, "^(.*?)_gut", 0, load_group_map(str(path)))
    assert splitter.key("loves_labour_lost_gut_f") == splitter.key("loves_labours_lost_gut")
    for seed in range(20):  # whatever the seed, the two land together
        s = Splitter(0.5, "^(.*?)_gut", seed, load_group_map(str(path)))
        assert s.split("loves_labour_lost_gut_f") == s.split("loves_labours_lost_gut")
