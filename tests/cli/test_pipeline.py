"""The data stages composed as a user composes them: clean | dedup | tokenize encode, through pipes."""

import subprocess
import sys

from corpus_fixtures import prose

from glm_cli.core.io.shards import ShardSet


def _glm(*args) -> list[str]:
    return [sys.executable, "-m", "glm_cli", *map(str, args)]


def test_clean_dedup_encode_streamed_equals_staged(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(6):
        (raw / f"doc{i}.txt").write_text(prose(12, seed=i))
    (raw / "copy.txt").write_text(prose(12, seed=0))  # an exact duplicate dedup must drop
    tok = tmp_path / "tok"
    subprocess.run(_glm("tokenize", "train", raw, "-o", tok, "--vocab-size", "300", "-q"), check=True)

    # Streamed: three processes joined by pipes, nothing on disk in between.
    clean = subprocess.Popen(_glm("clean", raw, "-o", "-", "-q"), stdout=subprocess.PIPE)
    dedup = subprocess.Popen(_glm("dedup", "-", "-o", "-", "-q"), stdin=clean.stdout, stdout=subprocess.PIPE)
    clean.stdout.close()
    encode = subprocess.run(_glm("tokenize", "encode", "-", "-t", tok, "-o", tmp_path / "streamed", "-q"),
                            stdin=dedup.stdout, capture_output=True)
    dedup.stdout.close()
    assert clean.wait() == 0 and dedup.wait() == 0 and encode.returncode == 0, encode.stderr.decode()

    # Staged: the same commands through files.
    subprocess.run(_glm("clean", raw, "-o", tmp_path / "clean.jsonl", "-q"), check=True)
    subprocess.run(_glm("dedup", tmp_path / "clean.jsonl", "-o", tmp_path / "dedup.jsonl", "-q"), check=True)
    subprocess.run(_glm("tokenize", "encode", tmp_path / "dedup.jsonl", "-t", tok, "-o", tmp_path / "staged",
                        "-q"), check=True)

    streamed, staged = ShardSet(tmp_path / "streamed"), ShardSet(tmp_path / "staged")
    assert streamed.total_documents == staged.total_documents == 6  # the copy is gone
    assert [a.tobytes() for a in streamed.arrays] == [a.tobytes() for a in staged.arrays]
