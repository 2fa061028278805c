"""docs/python_api.md's script runs as written: raw text to an evaluated model through core functions only."""

from __future__ import annotations

import json
import random
import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the king and the queen of the land went to the sea with their men, for it was said that the "
         "wind would bring news of the war from a far country where the people had been waiting").split()


def script(section: str = "Raw text to an evaluated model") -> str:
    """The one python block of a `## section` of docs/python_api.md."""
    text = (ROOT / "docs" / "python_api.md").read_text()
    part = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", part, re.S)
    assert len(blocks) == 1, f"docs/python_api.md's section {section!r} should hold exactly one python block"
    return blocks[0]


def write_corpus(raw: Path, n_docs: int = 24) -> None:
    """English-like prose (stop words, sentences) that passes the default clean rules, one file a document,
    plus one exact duplicate for dedup to drop."""
    rng = random.Random(0)
    raw.mkdir(parents=True)
    for d in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."
                     for _ in range(12)]
        (raw / f"doc{d:02d}.txt").write_text(" ".join(sentences) + "\n")
    (raw / "copy.txt").write_text((raw / "doc00.txt").read_text())


def test_python_api_script_runs_the_pipeline(tmp_path, monkeypatch, capsys):
    write_corpus(tmp_path / "data" / "raw")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(_saved(tmp_path)), run_name="__main__")
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "python_api"
    kept = int(re.search(r"clean: 25 documents in, (\d+) kept", out).group(1))
    assert kept >= 20
    dedup = [json.loads(line) for line in (run / "dedup.jsonl").read_text().splitlines()]
    assert len(dedup) == kept - 1  # the copy is gone
    assert (run / "tokenizer" / "tokenizer.json").exists() and (run / "shards" / "index.json").exists()
    assert "pretrain: completed after 20 steps" in out
    completion = json.loads((run / "completions.jsonl").read_text())
    assert completion["id"] == 1 and completion["completion_tokens"] > 0
    perplexity = float(re.search(r"eval: perplexity ([\d.]+)", out).group(1))
    assert 1 < perplexity < 512  # better than uniform over the 512-token vocabulary after 20 steps


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "python_api_example.py"
    path.write_text(script())
    return path
