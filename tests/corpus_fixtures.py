"""Corpus builders shared by the data tests (clean, dedup, corpus I/O, the pipeline and cluster recipes).

They live here, not in one test module, so that no test imports another test module.
"""

import random

from conftest import write_jsonl

from glm_cli.core.io.corpus import Columns, RecordWriter

SENTENCES = [
    "The river had risen in the night and the ferry would not cross until noon.",
    "She kept a ledger of every debt that the village owed to the mill.",
    "Nobody in the house could remember who had planted the walnut tree.",
    "When the letters stopped coming, her brother took the coach to London.",
    "A surveyor arrived with maps that showed roads where there were only fields.",
    "The schoolmaster read aloud from a history of the war with Spain.",
    "By autumn the orchard had given more apples than the cellar could hold.",
    "Rain came through the roof of the chapel and spoiled the painted saints.",
    "They sold the grey horse at the fair and bought a cart with the money.",
    "It was agreed that the bridge should be built of stone and not of timber.",
    "His mother wrote to say that the harvest was good and the lambs were strong.",
    "Every evening the old sailor walked to the harbour to watch the boats come in.",
]


def prose(n_sentences: int = 8, seed: int = 0) -> str:
    rng = random.Random(seed)
    picked = rng.sample(SENTENCES, min(n_sentences, len(SENTENCES)))
    return " ".join(picked[:4]) + "\n\n" + " ".join(picked[4:])


VOCAB = [f"w{k}" for k in range(3000)]


def words(rng: random.Random, n: int = 200) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def edit(rng: random.Random, ws: list[str], rate: float) -> list[str]:
    return [rng.choice(VOCAB) if rng.random() < rate else w for w in ws]


def sharded_corpus(tmp_path):
    """Three JSONL parts of 10 documents with exact and near duplicates across the parts, and a boilerplate
    line shared by all: the input of the sharded-dedup and parquet-dedup tests."""
    rng = random.Random(3)
    base = [" ".join(words(rng, 120)) + "\nCopyright notice of the publisher, all rights reserved.\n" for _ in range(30)]
    files = []
    for f in range(3):
        records = []
        for k in range(10):
            i = f * 10 + k
            text = base[i]
            if i % 7 == 3:  # duplicates across files: an exact copy and a near copy of earlier docs
                text = base[i // 2].upper()
            elif i % 7 == 5:
                text = " ".join(edit(rng, base[i - 4].split(), 0.005))
            records.append({"id": f"f{f}-{k}", "text": text, "source": f"file{f}"})
        files.append(write_jsonl(tmp_path / f"part{f}.jsonl", records))
    return files


# `glm clean` as a pure reader/writer: nothing is filtered or changed.
PASS_THROUGH = ["--no-langid", "--no-pii", "--no-gopher-quality", "--no-gopher-repetition", "--no-c4",
                "--no-c4-lines", "--no-navigation-lines", "--no-gutenberg", "--unicode-form", "none",
                "--keep-control", "--no-whitespace", "--html", "never", "-q"]


def write_parquet(path, rows, row_group_size=4, **columns):
    """Rows to a parquet file through glm's own writer, in small row groups so that readers cross groups."""
    with RecordWriter(str(path), Columns(**columns), row_group_size=row_group_size) as writer:
        for row in rows:
            writer.write(row)
    return path
