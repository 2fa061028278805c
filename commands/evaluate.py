"""`glm eval`: perplexity, multiple-choice and generation tasks, several checkpoints side by side.

Example:
    glm eval runs/demo/pretrain/final runs/demo/finetune/final --task runs/demo/tasks/mc_play.jsonl \\
        --task runs/demo/shards --json -o report.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from glm_cli.commands._common import JsonSummary, Quiet
from glm_cli.commands._model_options import DeviceOpt, DtypeOpt, resolve_device_dtype

# Metrics shown in the table, per task type (the JSON report has them all).
TABLE_METRICS = {
    "ppl": ("perplexity", "bits_per_byte", "word_perplexity"),
    "mc": ("acc", "acc_norm"),
    "gen": ("exact_match", "f1", "rouge_l", "bleu"),
}


def command(
    checkpoints: Annotated[list[str], typer.Argument(help="Checkpoint directories to evaluate and compare. "
                                                    "Example: glm eval runs/demo/pretrain/final runs/demo/sft "
                                                    "--task runs/demo/tasks/mc_play_test.jsonl --json")],
    task: Annotated[list[str], typer.Option("--task", help="Task: JSONL ({context, choices, gold} | {prompt, "
                                             "answers} | {text}), a .txt file, or a token-shard dir (its val "
                                             "split). Repeatable.")],
    task_type: Annotated[str, typer.Option("--task-type", help="auto (from the fields), mc, gen or ppl.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Sequences per forward pass "
                                            "(scores do not depend on it).")] = 16,
    max_length: Annotated[int, typer.Option("--max-length", min=0, help="Context used for scoring; 0 = "
                                            "the model's max_seq_len.")] = 0,
    stride: Annotated[int, typer.Option("--stride", min=0, help="Perplexity: new tokens predicted per window "
                                        "(0 = max length: lm-eval's rolling windows; smaller = more "
                                        "context per token).")] = 0,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Evaluate only the first N items/documents "
                                       "(0: all).")] = 0,
    num_fewshot: Annotated[int, typer.Option("--num-fewshot", min=0, help="Examples prepended to each item.")] = 0,
    fewshot_file: Annotated[str | None, typer.Option("--fewshot-file", help="JSONL of the same task type to "
                                                     "draw few-shot examples from.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the few-shot draw.")] = 1234,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Generation tasks: tokens "
                                                "to generate at most.")] = 32,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Generation tasks: stop string; "
                                                   "repeatable (default: newline).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Generation tasks: send each prompt as a user message "
                                       "in the chat template (for fine-tuned checkpoints).")] = False,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Also write the JSON report here.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    as_json: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Evaluate checkpoints on tasks and print one table comparing them.

    Example: glm eval runs/demo/pretrain/final runs/demo/finetune/final --task runs/demo/tasks/mc_play.jsonl
    """
    from glm_cli.core.console import log, set_quiet
    from glm_cli.core.eval.run import evaluate

    set_quiet(quiet)
    device, torch_dtype = resolve_device_dtype(device, dtype)

    def show(ckpt, t, result) -> None:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items() if k in TABLE_METRICS[t.type])
        log(f"{ckpt}  {t.name}: {shown}  ({result['seconds']}s)")

    report = evaluate(checkpoints, task, task_type=task_type, batch_size=batch_size, max_length=max_length,
                      stride=stride, limit=limit, num_fewshot=num_fewshot, fewshot_file=fewshot_file, seed=seed,
                      max_new_tokens=max_new_tokens, stop=stop, chat=chat, device=device, dtype=torch_dtype,
                      on_result=show)
    if output:
        from glm_cli.core.io.atomic import write_text_atomic

        write_text_atomic(output, json.dumps(report, indent=2) + "\n")
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    print_table(report)


def print_table(report: dict) -> None:
    import os

    from rich.console import Console
    from rich.table import Table

    checkpoints = report["checkpoints"]
    common = os.path.commonpath([os.path.abspath(c) for c in checkpoints]) if len(checkpoints) > 1 else None
    labels = [os.path.relpath(os.path.abspath(c), common) if common else Path(c).name or c for c in checkpoints]
    if len(set(labels)) != len(labels) or "." in labels:
        labels = checkpoints
    table = Table(title="glm eval", show_lines=False)
    table.add_column("task")
    table.add_column("n", justify="right")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    for name, task in report["tasks"].items():
        for i, metric in enumerate(TABLE_METRICS[task["type"]]):
            values = [report["results"][c][name]["metrics"].get(metric) for c in checkpoints]
            if all(v is None for v in values):
                continue
            lower_is_better = metric in ("perplexity", "bits_per_byte", "word_perplexity")
            known = [v for v in values if v is not None]
            best = (min(known) if lower_is_better else max(known)) if len(checkpoints) > 1 else None
            text = [None if v is None else (f"{v:.4f}" if abs(v) < 1e6 else f"{v:.4e}") for v in values]
            cells = ["-" if c is None else (f"[bold]{c}[/]" if v == best else c) for v, c in zip(values, text, strict=True)]
            n = str(report["results"][checkpoints[0]][name]["n"]) if i == 0 else ""
            table.add_row(name if i == 0 else "", n, metric, *cells)
    Console(width=max(100, 40 + 22 * len(checkpoints))).print(table)
