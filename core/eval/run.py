"""`evaluate`: several checkpoints on several tasks, one report; what `glm eval` runs, callable from a script.

    from glm_cli.core.eval.run import evaluate
    report = evaluate(["runs/a/final", "runs/b/final"], ["tasks/mc.jsonl", "shards"], limit=100)
    report["results"]["runs/a/final"]["mc"]["metrics"]["acc"]

Each checkpoint is loaded once (with the adapter it holds, `core.load.load_with_adapter`) and freed before
the next, so only one model is in memory at a time.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from glm_cli.core.console import progress
from glm_cli.core.errors import UsageError
from glm_cli.core.eval.tasks import Scorer, Task, evaluate_task, load_task, task_size
from glm_cli.core.io.corpus import read_records
from glm_cli.core.load import load_with_adapter
from glm_cli.core.tokens.tokenizer import load_tokenizer


def load_tasks(specs: list[str | Task], task_type: str = "auto") -> list[Task]:
    """Tasks from paths (`load_task`) or as given; two tasks with one name are told apart by their source."""
    tasks = [t if isinstance(t, Task) else load_task(t, task_type) for t in specs]
    counts = Counter(t.name for t in tasks)
    for t in tasks:
        if counts[t.name] > 1:
            t.name = t.source
    return tasks


def evaluate(checkpoints: list[str], tasks: list[str | Task], *, task_type: str = "auto", batch_size: int = 16,
             max_length: int = 0, stride: int = 0, limit: int = 0, num_fewshot: int = 0,
             fewshot_file: str | None = None, seed: int = 1234, max_new_tokens: int = 32,
             stop: list[str] | None = None, chat: bool = False, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = torch.float32,
             on_result: Callable[[str, Task, dict], None] | None = None) -> dict:
    """The report `glm eval --json` prints: {"checkpoints", "tasks", "settings", "results": {checkpoint:
    {task name: {"n", "metrics", "seconds", ...}}}}. 0 for `max_length`, `stride` or `limit` means the
    model's context, full windows, every item. `on_result(checkpoint, task, result)` is called after each."""
    if fewshot_file is None and num_fewshot:
        raise UsageError("--num-fewshot needs --fewshot-file")
    tasks = load_tasks(tasks, task_type)
    pool = list(read_records(fewshot_file)) if fewshot_file else None
    report = {"checkpoints": list(checkpoints),
              "tasks": {t.name: {"type": t.type, "source": t.source} for t in tasks},
              "settings": {"batch_size": batch_size, "max_length": max_length, "stride": stride, "limit": limit,
                           "num_fewshot": num_fewshot, "seed": seed, "chat": chat},
              "results": {}}
    for ckpt in checkpoints:
        model = load_with_adapter(ckpt, device=device, dtype=dtype)  # picks up a saved adapter
        scorer = Scorer(model, load_tokenizer(ckpt), max_length=max_length, batch_size=batch_size,
                        checkpoint_dir=ckpt)
        report["results"][ckpt] = {}
        for t in tasks:
            started = time.perf_counter()
            with progress(f"{Path(ckpt).name}: {t.name}", task_size(t, limit or None)) as advance:
                result = evaluate_task(scorer, t, fewshot=pool, num_fewshot=num_fewshot, seed=seed,
                                       limit=limit or None, stride=stride or None,
                                       max_new_tokens=max_new_tokens, stop=stop, chat=chat, advance=advance)
            result.pop("predictions", None)
            result["seconds"] = round(time.perf_counter() - started, 2)
            report["results"][ckpt][t.name] = result
            if on_result is not None:
                on_result(ckpt, t, result)
        del model, scorer
    return report
