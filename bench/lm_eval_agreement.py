"""Does `glm eval` give the numbers lm-evaluation-harness gives? Same checkpoint, same local tasks.

lm_eval loads the checkpoint through its Hugging Face form (`--model hf`, transformers' LlamaForCausalLM
and AutoTokenizer) from local task YAMLs (`dataset_path: json` + `data_files`, via `include_path`),
fully offline; glm scores the same JSONL files with its own model and tokenizer code. Compared: the
perplexity metrics (word_perplexity, byte_perplexity, bits_per_byte) of a rolling-loglikelihood task,
acc and acc_norm of a multiple-choice task, and every per-choice log-likelihood.

    .venv/bin/pip install lm-eval accelerate
    .venv/bin/python bench/lm_eval_agreement.py                          # builds a small model and tasks
    .venv/bin/python bench/lm_eval_agreement.py --checkpoint runs/demo/pretrain/final \\
        --mc runs/demo/tasks/mc_play_val.jsonl --ppl runs/demo/tasks/ppl_val.jsonl

Exit status 1 when any metric differs at the 4th decimal.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py): keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def build_defaults(work: Path, train_steps: int) -> tuple[Path, Path, Path]:
    """A small Llama briefly trained on three plays (with a tokenizer trained on them), and MC/ppl tasks
    from the same plays' text."""
    import random

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from glm_cli.core.checkpoint.directory import save_checkpoint
    from glm_cli.core.model.config import preset
    from glm_cli.core.model.transformer import Transformer
    from glm_cli.core.tokens.tokenizer import SPECIAL_TOKENS, write_hf_tokenizer_config

    plays = {"Hamlet": "hamlet_gut.txt", "Macbeth": "macbeth_gut.txt", "Othello": "othello_gut.txt"}
    texts = {name: (ROOT / "data/raw/texts" / f).read_text(encoding="utf-8") for name, f in plays.items()}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts.values()), trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (work / "tok").mkdir(parents=True)
    tok.save(str(work / "tok/tokenizer.json"))
    write_hf_tokenizer_config(work / "tok")
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=1024, max_seq_len=128, tie_embeddings=False,
                               bos_token_id=0, eos_token_id=0, pad_token_id=1))
    ids = torch.tensor([i for t in texts.values() for i in tok.encode(t).ids])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(train_steps):  # a few hundred steps: distributions far from uniform, choices not tied
        starts = torch.randint(0, len(ids) - 129, (16,), generator=gen)
        batch = torch.stack([ids[s:s + 129] for s in starts.tolist()])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    ckpt = save_checkpoint(work / "ckpt", model, tokenizer_dir=work / "tok")

    rng = random.Random(0)
    mc, ppl = [], []
    for name, text in texts.items():
        lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 30]
        for _ in range(20):
            line = rng.choice(lines)
            mc.append({"context": f"{line}\nThis line is from the play", "choices": [f" {p}" for p in plays],
                       "gold": list(plays).index(name)})
        start = rng.randrange(len(text) - 3000)
        ppl.append({"text": text[start:start + 3000]})
    write_jsonl(work / "mc.jsonl", mc)
    write_jsonl(work / "ppl.jsonl", ppl)
    return ckpt, work / "mc.jsonl", work / "ppl.jsonl"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def task_yamls(directory: Path, mc: Path | None, ppl: Path) -> None:
    """Local lm-eval task files: glm_agree_mc (unless `mc` is None) and glm_agree_ppl."""
    directory.mkdir(parents=True, exist_ok=True)
    if mc is not None:
        (directory / "glm_agree_mc.yaml").write_text(f"""task: glm_agree_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc.resolve()}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (directory / "glm_agree_ppl.yaml").write_text(f"""task: glm_agree_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ppl.resolve()}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")


def run_lm_eval(ckpt: Path, yaml_dir: Path, max_length: int, batch_size: int, mc: bool = True) -> dict:
    """lm-eval `--model hf` on the task files of `task_yamls` (without the MC task when `mc` is False)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = ["glm_agree_mc", "glm_agree_ppl"] if mc else ["glm_agree_ppl"]
    result = simple_evaluate(model="hf", model_args=f"pretrained={ckpt},dtype=float32,max_length={max_length}",
                             tasks=tasks, task_manager=TaskManager(include_path=str(yaml_dir)),
                             batch_size=batch_size, device="cpu", log_samples=mc)
    ppl = result["results"]["glm_agree_ppl"]
    out = {"word_perplexity": ppl["word_perplexity,none"], "byte_perplexity": ppl["byte_perplexity,none"],
           "bits_per_byte": ppl["bits_per_byte,none"]}
    if mc:
        scores = result["results"]["glm_agree_mc"]
        samples = sorted(result["samples"]["glm_agree_mc"], key=lambda s: s["doc_id"])
        out.update(acc=scores["acc,none"], acc_norm=scores["acc_norm,none"],
                   lls=[[r[0] for r in s["filtered_resps"]] for s in samples])
    return out


def run_glm(ckpt: Path, mc: Path, ppl: Path, max_length: int, batch_size: int) -> dict:
    from glm_cli.core.eval.tasks import Scorer, evaluate_mc, evaluate_ppl, load_task
    from glm_cli.core.load import load_model
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    scorer = Scorer(load_model(ckpt), load_tokenizer(ckpt), max_length=max_length, batch_size=batch_size)
    m = evaluate_mc(scorer, load_task(str(mc), "mc"))
    p = evaluate_ppl(scorer, load_task(str(ppl), "ppl"))
    return {"acc": m["metrics"]["acc"], "acc_norm": m["metrics"]["acc_norm"],
            **{k: p["metrics"][k] for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")},
            "lls": [pred["lls"] for pred in m["predictions"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--mc", type=Path, help="MC task JSONL {context, choices, gold}")
    parser.add_argument("--ppl", type=Path, help="perplexity task JSONL {text}")
    parser.add_argument("--max-length", type=int, default=0, help="0: the checkpoint's max_seq_len")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=300, help="training steps of the built model")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N items of each task")
    parser.add_argument("--json", type=Path, help="write the comparison here")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, mc, ppl = args.checkpoint, args.mc, args.ppl
        if ckpt is None or mc is None or ppl is None:
            built = build_defaults(work / "built", args.train_steps)
            ckpt, mc, ppl = ckpt or built[0], mc or built[1], ppl or built[2]
        if args.limit:
            for name in ("mc", "ppl"):
                src = {"mc": mc, "ppl": ppl}[name]
                lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:args.limit]
                (work / f"{name}_limited.jsonl").write_text("".join(lines), encoding="utf-8")
            mc, ppl = work / "mc_limited.jsonl", work / "ppl_limited.jsonl"
        from glm_cli.core.model.config import ModelConfig

        max_length = args.max_length or ModelConfig.load(ckpt).max_seq_len
        task_yamls(work / "tasks", mc, ppl)
        theirs = run_lm_eval(ckpt, work / "tasks", max_length, args.batch_size)
        ours = run_glm(ckpt, mc, ppl, max_length, args.batch_size)
    rows, ok = [], True
    for key in ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        same = round(ours[key], 4) == round(theirs[key], 4)
        ok &= same
        rows.append({"metric": key, "glm": ours[key], "lm_eval": theirs[key], "equal_to_4_decimals": same})
    diffs = [abs(a - b) for x, y in zip(ours["lls"], theirs["lls"], strict=True) for a, b in zip(x, y, strict=True)]
    summary = {"checkpoint": str(ckpt), "mc_task": str(mc), "ppl_task": str(ppl), "max_length": max_length,
               "metrics": rows, "choice_loglikelihoods": len(diffs), "max_abs_loglikelihood_diff": max(diffs),
               "agree": ok}
    for r in rows:
        print(f"{r['metric']:16s} glm {r['glm']:.6f}   lm_eval {r['lm_eval']:.6f}   "
              f"{'equal' if r['equal_to_4_decimals'] else 'DIFFERENT'} to 4 decimals")
    print(f"{len(diffs)} per-choice log-likelihoods, max |glm - lm_eval| = {max(diffs):.2e}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
