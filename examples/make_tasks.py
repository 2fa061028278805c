"""Evaluation tasks, instruction data and preference pairs from the cleaned Shakespeare corpus.

    .venv/bin/python examples/make_tasks.py runs/demo/clean.jsonl -o runs/demo/tasks

Nothing is downloaded: every question is built from the plays' own text, so every answer can be checked
against it. Three kinds of question, each as multiple choice, as a generation task and as instruction
data: which play a passage comes from, which character speaks a line, which line comes next.

Splits (see docs/generate_eval.md for the file formats):
- test: questions about the *held-out plays*: the documents `glm tokenize encode --val-fraction F
  --group-pattern P --seed S` puts in its val split (the same `Splitter`, so exactly those plays). Neither
  pretraining nor fine-tuning sees them. Items sharing a word 8-gram with any training play are dropped
  (a play's other edition can be in training when its file name is spelled differently), and val plays
  whose other edition is in training under a near-identical name are left out of test altogether.
- val: questions about training plays that are held out from the instruction/preference training files
  (decided by a hash of the question), for validation during fine-tuning.
- train: the remaining questions about training plays.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

from glm_cli.core.io.corpus import read_records
from glm_cli.core.tokens.encode import Splitter, load_group_map

SPEAKER = re.compile(r"([A-Z][A-Za-z'\- ]{0,28}[A-Za-z])\.")
NOT_SPEAKERS = {"ACT", "SCENE", "Scene", "Scena", "Actus", "Enter", "Exit", "Exeunt", "FINIS", "THE END", "Epilogue",
                "Prologue", "PROLOGUE", "EPILOGUE", "Chorus"}
SMALL_WORDS = {"of", "the", "and", "a", "in", "about"}
ROMAN = {"i", "ii", "iii", "iv", "v", "vi", "vii", "viii"}


def title_for(key: str) -> str:
    """'henry_iv_part_1' -> 'Henry IV Part 1'; 'much_ado_about_nothing' -> 'Much Ado about Nothing'."""
    words = re.split(r"[_\-]+", key)
    out = []
    for i, w in enumerate(words):
        if w in ROMAN:
            out.append(w.upper())
        elif i and w in SMALL_WORDS:
            out.append(w)
        else:
            out.append(w.capitalize())
    return " ".join(out)


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every speech in the modern Gutenberg layout: a line holding only the speaker's
    name and a period, then the speech up to a blank line. Stage directions ([...]) are dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip("\n").split("\n")]
        if len(lines) < 2:
            continue
        m = SPEAKER.fullmatch(lines[0])
        if not m or m.group(1) in NOT_SPEAKERS or m.group(1).split()[0] in NOT_SPEAKERS:
            continue
        body = [ln for ln in lines[1:] if ln and not ln.startswith("[") and not SPEAKER.fullmatch(ln)]
        if body:
            out.append((m.group(1), body))
    return out


def display_name(name: str) -> str:
    return name.title() if name.isupper() else name


def words8(text: str) -> set[int]:
    """Hashes of the word 8-grams of a text (lower case, letters only): the contamination test."""
    words = re.sub(r"[^a-z ]+", " ", text.lower()).split()
    return {hash(tuple(words[i:i + 8])) for i in range(len(words) - 7)}


def stable_fraction(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2.0 ** 64


class Play:
    def __init__(self, doc_id: str, key: str, text: str):
        self.id, self.key, self.text = doc_id, key, text
        self.title = title_for(key)
        self.speeches = speeches(text)
        counts = Counter(s for s, _ in self.speeches)
        self.characters = [s for s, n in counts.most_common() if n >= 5]


def make_items(play: Play, rng: random.Random, titles: list[str], per_kind: int) -> list[dict]:
    """Questions of the three kinds about one play, each with its answer and a plausible wrong answer."""
    items = []
    sp = play.speeches
    usable = [i for i in range(1, len(sp)) if sp[i][0] in play.characters and len(sp[i][1][0]) >= 15]
    other_titles = [t for t in titles if difflib.SequenceMatcher(None, t.lower(), play.title.lower()).ratio() < 0.8]
    lines = [ln for _, body in sp for ln in body if len(ln) >= 20]

    # which play: a passage of consecutive speeches (names included, as in the text)
    for i in rng.sample(range(len(sp) - 3), min(per_kind, max(len(sp) - 3, 0))):
        passage = "\n\n".join(f"{s}.\n" + "\n".join(b[:4]) for s, b in sp[i:i + 2])
        if len(passage) < 80:
            continue
        wrong = rng.sample(other_titles, 3)
        items.append({"kind": "play", "play": play.title, "passage": passage, "answer": play.title,
                      "distractors": wrong, "question": f"Which play is this passage from?\n\n{passage}"})
    # which character speaks a line: after the previous speech, as in the text
    for i in rng.sample(usable, min(per_kind, len(usable))):
        speaker, body = sp[i]
        others = [c for c in play.characters if c != speaker]
        if len(others) < 3:
            continue
        prev_speaker, prev_body = sp[i - 1]
        context = f"{prev_speaker}.\n" + "\n".join(prev_body[-3:]) + "\n\n"
        items.append({"kind": "speaker", "play": play.title, "context": context, "line": body[0],
                      "answer": speaker, "distractors": rng.sample(others, 3),
                      "question": f"In {play.title}, which character says: \"{body[0]}\"?"})
    # which line comes next: inside a speech of at least three lines
    long_speeches = [i for i, (_, b) in enumerate(sp) if len(b) >= 3 and all(len(x) >= 15 for x in b[:3])]
    for i in rng.sample(long_speeches, min(per_kind, len(long_speeches))):
        speaker, body = sp[i]
        k = rng.randrange(2, len(body))
        if len(body[k]) < 15:
            continue
        wrong = [ln for ln in rng.sample(lines, 6) if ln != body[k] and ln not in body][:3]
        if len(wrong) < 3:
            continue
        items.append({"kind": "next_line", "play": play.title, "speaker": speaker, "before": body[:k],
                      "answer": body[k], "distractors": wrong,
                      "question": f"In {play.title}, what line comes after:\n\"{body[k - 1]}\"?"})
    return items


def mc_record(item: dict, rng: random.Random) -> dict:
    """{context, choices, gold} in the text's own layout, so a base model can score the choices."""
    options = [item["answer"]] + item["distractors"]
    rng.shuffle(options)
    gold = options.index(item["answer"])
    if item["kind"] == "play":
        context, choices = f"{item['passage']}\n\nThis passage is from the play", [f" {o}" for o in options]
    elif item["kind"] == "speaker":
        context, choices = item["context"], [f"{o}.\n{item['line']}" for o in options]
    else:
        context = f"{item['speaker']}.\n" + "\n".join(item["before"]) + "\n"
        choices = options
    return {"context": context, "choices": choices, "gold": gold, "kind": item["kind"], "play": item["play"]}


def gen_record(item: dict) -> dict | None:
    """{prompt, answers} for greedy generation stopped at a newline."""
    if item["kind"] == "speaker":
        return {"prompt": item["context"], "answers": [item["answer"], display_name(item["answer"])],
                "kind": "speaker", "play": item["play"]}
    if item["kind"] == "next_line":
        return {"prompt": f"{item['speaker']}.\n" + "\n".join(item["before"]) + "\n", "answers": [item["answer"]],
                "kind": "next_line", "play": item["play"]}
    return None


def answer_text(item: dict, value: str) -> str:
    return display_name(value) if item["kind"] == "speaker" else value


def write_jsonl(path: Path, records: list[dict]) -> int:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help="cleaned corpus JSONL ({id, text}), e.g. runs/demo/clean.jsonl")
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as given to `glm tokenize encode`")
    parser.add_argument("--group-pattern", default="^(.*?)_gut", help="as given to `glm tokenize encode`")
    parser.add_argument("--group-map", default=None, help="as given to `glm tokenize encode`")
    parser.add_argument("--split-seed", type=int, default=0, help="the --seed given to `glm tokenize encode`")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question sampling")
    parser.add_argument("--per-play", type=int, default=40, help="questions of each kind per training play")
    parser.add_argument("--per-test-play", type=int, default=120, help="questions of each kind per held-out play")
    parser.add_argument("--mc-items", type=int, default=150, help="items per multiple-choice test task")
    parser.add_argument("--gen-items", type=int, default=100, help="items per generation test task")
    parser.add_argument("--question-holdout", type=float, default=0.1,
                        help="fraction of questions about training plays kept out of the training files")
    args = parser.parse_args()

    splitter = Splitter(args.val_fraction, args.group_pattern, args.split_seed, load_group_map(args.group_map))
    rng = random.Random(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    docs = [(r["id"], r["text"]) for r in read_records(args.corpus) if isinstance(r.get("text"), str)]
    train_text = [t for i, t in docs if splitter.split(str(i)) == "train"]
    # Plays in the modern layout (editions ending in _gut_f use the Folio layout and are not parsed).
    plays = []
    for doc_id, text in docs:
        doc_id = str(doc_id)
        if doc_id.endswith("_gut_f") or "_gut" not in doc_id:
            continue
        play = Play(doc_id, splitter.key(doc_id), text)
        if len(play.speeches) >= 50 and len(play.characters) >= 4:
            plays.append((play, splitter.split(doc_id)))
    if not plays:
        sys.exit(f"{args.corpus}: no plays found (expected ids like hamlet_gut with speaker lines)")
    train_keys = {splitter.key(str(i)) for i, _ in docs if splitter.split(str(i)) == "train"}
    titles = sorted({p.title for p, _ in plays})
    seen = set()
    for text in train_text:
        seen |= words8(text)

    test_items, val_items, train_items, excluded = [], [], [], []
    for play, split in plays:
        items = make_items(play, rng, titles, args.per_test_play if split == "val" else args.per_play)
        if split == "val":
            twins = difflib.get_close_matches(play.key, sorted(train_keys), n=1, cutoff=0.85)
            if twins:  # e.g. loves_labours_lost (val) vs loves_labour_lost (Folio, train)
                excluded.append({"play": play.title, "train_edition": twins[0]})
                continue
            test_items += [it for it in items if not (words8(json.dumps(it, ensure_ascii=False)) & seen)]
        else:
            for it in items:
                (val_items if stable_fraction(it["question"]) < args.question_holdout else train_items).append(it)
    rng.shuffle(test_items)

    counts = {}
    for split, items, mc_n, gen_n in [("test", test_items, args.mc_items, args.gen_items),
                                      ("val", val_items, args.mc_items, args.gen_items)]:
        for kind in ("play", "speaker", "next_line"):
            chosen = [it for it in items if it["kind"] == kind]
            counts[f"mc_{kind}_{split}"] = write_jsonl(out / f"mc_{kind}_{split}.jsonl",
                                                       [mc_record(it, rng) for it in chosen[:mc_n]])
            gens = [g for g in (gen_record(it) for it in chosen[:gen_n]) if g]
            if gens:
                counts[f"gen_{kind}_{split}"] = write_jsonl(out / f"gen_{kind}_{split}.jsonl", gens)
    for split, items in [("train", train_items), ("val", val_items), ("test", test_items)]:
        sft = [{"prompt": it["question"], "response": answer_text(it, it["answer"]), "kind": it["kind"],
                "play": it["play"]} for it in items]
        prefs = [{"prompt": it["question"], "chosen": answer_text(it, it["answer"]),
                  "rejected": answer_text(it, it["distractors"][0]), "kind": it["kind"], "play": it["play"]}
                 for it in items]
        counts[f"sft_{split}"] = write_jsonl(out / f"sft_{split}.jsonl", sft)
        if split != "train":  # short-answer questions for chat models: `glm eval --chat`
            qa = [{"prompt": it["question"], "answers": [answer_text(it, it["answer"])], "kind": it["kind"],
                   "play": it["play"]} for it in items if it["kind"] in ("play", "speaker")]
            counts[f"qa_{split}"] = write_jsonl(out / f"qa_{split}.jsonl", qa[:args.gen_items])
        counts[f"prefs_{split}"] = write_jsonl(out / f"prefs_{split}.jsonl", prefs)
    # Held-out text for perplexity: passages of the test plays (full documents are in the val shards).
    ppl = []
    for play, split in plays:
        if split == "val" and play.title not in {e["play"] for e in excluded}:
            for start in range(5000, len(play.text) - 4000, max((len(play.text) - 9000) // 6, 4000)):
                ppl.append({"text": play.text[start:start + 3000], "play": play.title})
    counts["ppl_test"] = write_jsonl(out / "ppl_test.jsonl", ppl)
    test_plays = sorted({it["play"] for it in test_items})
    manifest = {"corpus": args.corpus, "split": {"val_fraction": args.val_fraction, "group_pattern": args.group_pattern,
                                                 "seed": args.split_seed},
                "val_documents": sorted(str(i) for i, _ in docs if splitter.split(str(i)) == "val"),
                "test_plays": test_plays, "excluded_val_plays": excluded,
                "train_plays": sorted({p.title for p, s in plays if s == "train"}),
                "question_holdout": args.question_holdout, "seed": args.seed, "files": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"make_tasks: test plays {test_plays}; excluded {[e['play'] for e in excluded]}", file=sys.stderr)
    for name, n in counts.items():
        print(f"  {name:24s} {n:6d}", file=sys.stderr)


if __name__ == "__main__":
    main()
