"""Chat-format evaluation tasks from the demo's held-out instruction questions, for `glm eval`.

    .venv/bin/python examples/chat_tasks.py runs/demo/tasks --split val

The fine-tuning and alignment stages teach the model to answer *questions* in the chat template; the
fair test of those stages asks held-out questions (never trained on) the same way. From
`prefs_{split}.jsonl` ({prompt, chosen, rejected, kind}) this writes, per question kind:

- `chat_mc_{kind}_{split}.jsonl`: {context, choices, gold} multiple choice between the right and the
  wrong answer, the context being the rendered chat prompt (`<|user|>\\n{question}<|end|>\\n<|assistant|>\\n`)
  and each choice an answer followed by `<|end|>` (the model must also stop). `glm eval` scores it by
  log-likelihood like any multiple-choice task; the special tokens are parsed from the text.
- `chat_gen_{kind}_{split}.jsonl`: {prompt, answers} for `glm eval --chat` (greedy answer, exact match).

The order of the two choices is drawn with a fixed seed, so the gold index is not always 0.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

from glm_cli.core.io.corpus import read_records
from glm_cli.core.tokens.chat import prompt_messages, render_text
from glm_cli.core.tokens.tokenizer import END_OF_TURN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", help="directory written by examples/make_tasks.py")
    parser.add_argument("--split", default="val", help="which prefs_{split}.jsonl to convert (default: val)")
    parser.add_argument("--limit", type=int, default=150, help="questions per kind at most")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tasks = Path(args.tasks)
    source = tasks / f"prefs_{args.split}.jsonl"
    if not source.exists():
        sys.exit(f"chat_tasks: no {source} (run examples/make_tasks.py first)")
    rng = random.Random(args.seed)
    mc, gen = defaultdict(list), defaultdict(list)
    for record in read_records(str(source)):
        kind = record.get("kind", "all")
        if len(mc[kind]) >= args.limit:
            continue
        context = render_text(prompt_messages(record["prompt"]), add_generation_prompt=True)
        choices = [record["chosen"] + END_OF_TURN, record["rejected"] + END_OF_TURN]
        gold = 0
        if rng.random() < 0.5:
            choices.reverse()
            gold = 1
        mc[kind].append({"context": context, "choices": choices, "gold": gold, "kind": kind})
        gen[kind].append({"prompt": record["prompt"], "answers": [record["chosen"]], "kind": kind})
    counts = {}
    for kind in sorted(mc):
        for name, rows in ((f"chat_mc_{kind}_{args.split}", mc[kind]), (f"chat_gen_{kind}_{args.split}", gen[kind])):
            (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                 encoding="utf-8")
            counts[name] = len(rows)
    print(json.dumps(counts), file=sys.stderr)


if __name__ == "__main__":
    main()
