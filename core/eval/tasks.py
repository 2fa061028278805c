"""Evaluation: perplexity, multiple choice and generation tasks, scored the way lm-evaluation-harness does.

Everything reduces to one primitive, `loglikelihoods(requests)`: for (context ids, continuation ids) it
returns the summed log-probability of the continuation and whether greedy decoding would produce it.
As in lm-evaluation-harness (`HFLM._loglikelihood_tokens`), the model input is
`(context + continuation)[-(max_length + 1):][:-1]` and the last len(continuation) positions are scored.

- Perplexity (`loglikelihood_rolling` in lm-eval): a text is cut into windows of at most `max_length`
  tokens (`rolling_windows`); the first is preceded by a prefix token (BOS/EOS), every later window
  predicts `stride` new tokens conditioned on the `max_length - stride` tokens before them. stride =
  max_length is lm-eval's setting (disjoint predictions, each window full of context).
- Multiple choice: each choice is scored as the continuation of the context, tokenized as lm-eval does
  (`encode(context + choice)` split at `len(encode(context))`, trailing context spaces moved to the
  choice). acc = argmax of the log-likelihoods, acc_norm = argmax of ll / len(choice) in characters
  (lm-eval's `acc_norm`), acc_bytes = argmax of ll / UTF-8 bytes (lm-eval's `acc_bytes`).
- Generation: greedy completion of the prompt, cut at stop strings, scored by exact match, token F1,
  ROUGE-L (max over references) and corpus BLEU (`glm_cli.core.eval.text_metrics`).

Batch independence: requests are sorted by length and right-padded; in a causal model, padding after a
sequence cannot change its logits, so a request scores the same in any batch (tested at 1 vs 32).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from glm_cli.core.errors import DataError, GlmError, UsageError

TASK_TYPES = ("mc", "gen", "ppl")


# ------------------------------------------------------------------------------------------ primitives


@dataclass(slots=True)
class Scorer:
    """A model and its tokenizer, with lm-eval's conventions for encoding and scoring."""

    model: torch.nn.Module
    tokenizer: object
    max_length: int = 0
    batch_size: int = 16
    prefix_token_id: int = 0
    checkpoint_dir: str | None = None
    """Where the model came from: its chat template and generation_config.json (end-of-turn ids)."""

    def __post_init__(self):
        if self.max_length <= 0:
            self.max_length = self.model.config.max_seq_len
        config = self.model.config
        prefix = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
        self.prefix_token_id = prefix if prefix is not None else 0

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context go to the continuation; the continuation's
        ids are those of encode(context + continuation) after the first len(encode(context))."""
        if context == "":
            return [self.prefix_token_id], self.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids):]

    @torch.inference_mode()
    def loglikelihoods(self, requests: list[tuple[list[int], list[int]]],
                       advance=None) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy?) per request, in request order."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            inputs, spans = [], []
            for i in chunk:
                context, continuation = requests[i]
                if not continuation:
                    raise GlmError("a continuation has no tokens to score")
                if len(continuation) > self.max_length:
                    raise GlmError(f"a continuation of {len(continuation)} tokens exceeds max length {self.max_length}")
                inp = (context + continuation)[-(self.max_length + 1):][:-1]
                inputs.append(inp)
                spans.append((len(inp) - len(continuation), len(inp)))
            width = max(len(x) for x in inputs)
            batch = torch.full((len(inputs), width), pad, dtype=torch.long)
            for row, inp in enumerate(inputs):
                batch[row, :len(inp)] = torch.tensor(inp)  # right padding: invisible to earlier positions
            logits = self.model(batch.to(self.device))
            for row, i in enumerate(chunk):
                lo, hi = spans[row]
                target = torch.tensor(requests[i][1], device=logits.device)
                logprobs = F.log_softmax(logits[row, lo:hi].float(), dim=-1)
                ll = logprobs.gather(-1, target[:, None]).sum().item()
                greedy = bool((logprobs.argmax(-1) == target).all())
                results[i] = (ll, greedy)
            if advance is not None:
                advance(len(chunk))
        return results  # type: ignore[return-value]


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int,
                    stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that predict every token of `tokens` exactly once.

    lm-eval's `get_rolling_token_windows` + `make_disjoint_window` with context_len = max_length -
    stride + 1: the first window predicts the first min(max_length, n) tokens after `prefix_token`;
    each later one predicts the next `stride` tokens with as much preceding context as fits.
    """
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise UsageError(f"stride {stride} must be in 1..{max_length}")
    if not tokens:
        return []
    windows = []
    first = min(max_length, len(tokens))
    windows.append(([prefix_token] + tokens[:first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, stride)
        end = predicted + n
        inputs = tokens[max(end - max_length - 1, 0):end - 1]
        windows.append((inputs, tokens[end - n:end]))
        predicted += n
    # make_disjoint_window: the context is the part of the inputs before the predicted tokens
    return [(inp[:len(inp) - (len(pred) - 1)], pred) for inp, pred in windows]


# ------------------------------------------------------------------------------------------ tasks


@dataclass(slots=True)
class Task:
    name: str
    type: str
    records: list[dict] = field(default_factory=list)
    """mc: {context, choices, gold}; gen: {prompt, answers}; ppl: {text}."""
    shard_dir: str | None = None
    """ppl on token shards: their val split."""
    source: str = ""


def detect_type(record: dict) -> str:
    if "choices" in record:
        return "mc"
    if "answers" in record or "answer" in record:
        return "gen"
    if "text" in record:
        return "ppl"
    raise UsageError("cannot tell the task type from its fields; pass --task-type mc|gen|ppl")


def _check_record(record: dict, kind: str, source: str, line: int) -> dict:
    if kind == "mc":
        choices, gold = record.get("choices"), record.get("gold")
        if not isinstance(record.get("context"), str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) and c for c in choices):
            raise DataError(source, line, 'expected {"context": str, "choices": [str, str, ...], "gold": int}')
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(source, line, f"gold must be an index into the {len(choices)} choices")
    elif kind == "gen":
        answers = record.get("answers", record.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(record.get("prompt"), str) or not isinstance(answers, list) or not answers \
                or not all(isinstance(a, str) for a in answers):
            raise DataError(source, line, 'expected {"prompt": str, "answers": [str, ...]}')
        record = {**record, "answers": answers}
    elif not isinstance(record.get("text"), str):
        raise DataError(source, line, 'expected {"text": str}')
    return record


def load_task(path: str, task_type: str = "auto", limit: int | None = None) -> Task:
    """A task from a JSONL file (mc/gen/ppl), a text file (ppl, one document) or a shard dir (ppl, val)."""
    from glm_cli.core.io.corpus import read_records

    p = Path(path)
    if task_type not in ("auto",) + TASK_TYPES:
        raise UsageError(f"--task-type {task_type}: choose auto, mc, gen or ppl")
    if p.is_dir():
        if not (p / "index.json").exists():
            raise GlmError(f"{path}: a directory task must be token shards (no index.json)")
        if task_type not in ("auto", "ppl"):
            raise UsageError(f"{path}: token shards can only be a ppl task")
        return Task(name=p.name, type="ppl", shard_dir=str(p), source=path)
    if not p.exists():
        raise GlmError(f"{path}: no such task file")
    name = re.sub(r"\.jsonl(\.zst)?$|\.txt$", "", p.name)
    if not re.search(r"\.jsonl(\.zst)?$", p.name):
        if task_type not in ("auto", "ppl"):
            raise UsageError(f"{path}: a plain text file can only be a ppl task")
        return Task(name=name, type="ppl", records=[{"text": p.read_text(encoding="utf-8")}], source=path)
    records = []
    kind = None if task_type == "auto" else task_type
    for number, record in enumerate(read_records(path), start=1):
        kind = kind or detect_type(record)
        records.append(_check_record(record, kind, path, number))
        if limit and len(records) >= limit:
            break
    if not records:
        raise GlmError(f"{path}: the task has no items")
    return Task(name=name, type=kind, records=records, source=path)


def fewshot_prefix(pool: list[dict], kind: str, k: int, seed: int, index: int, exclude: dict) -> str:
    """k examples drawn from `pool` for item `index` with a fixed seed (never the item itself),
    each rendered as its context and gold answer, followed by a blank line."""
    if k <= 0:
        return ""
    rng = random.Random(f"{seed}:{index}")
    candidates = [r for r in pool if r is not exclude and r != exclude]
    if len(candidates) < k:
        raise UsageError(f"--num-fewshot {k}: the few-shot file has only {len(candidates)} usable examples")
    shots = rng.sample(candidates, k)
    if kind == "mc":
        rendered = [s["context"] + s["choices"][s["gold"]] for s in shots]
    elif kind == "gen":
        answers = [s.get("answers", s.get("answer")) for s in shots]
        rendered = [s["prompt"] + (a if isinstance(a, str) else a[0]) for s, a in zip(shots, answers, strict=True)]
    else:
        raise UsageError("few-shot examples apply to mc and gen tasks only")
    return "".join(r + "\n\n" for r in rendered)


# ------------------------------------------------------------------------------------------ evaluators


def _documents(task: Task, scorer: Scorer, limit: int | None):
    """(token ids, text or None, utf-8 bytes) of every document of a ppl task."""
    if task.shard_dir is None:
        for record in task.records[:limit] if limit else task.records:
            text = record["text"]
            yield scorer.encode(text), text, len(text.encode("utf-8"))
        return
    import numpy as np

    from glm_cli.core.io.shards import ShardSet

    shards = ShardSet(task.shard_dir, "val")
    if len(shards) == 0:
        raise GlmError(f"{task.shard_dir}: no val split (encode with `glm tokenize encode --val-fraction`)")
    eot = shards.index.eot_token_id
    # Bytes are per shard in the index: spread over its documents by token share for --limit runs.
    count = 0
    for s, array in enumerate(shards.arrays):
        offsets = list(shards.doc_offsets(s)) + [len(array)]
        info = shards.infos[s]
        for a, b in zip(offsets[:-1], offsets[1:], strict=True):
            ids = np.asarray(array[a:b]).astype(np.int64).tolist()
            while ids and ids[-1] == eot:
                ids.pop()
            while ids and ids[0] == eot:
                ids.pop(0)
            if ids:
                yield ids, None, info.bytes * (b - a) / max(info.tokens, 1)
            count += 1
            if limit and count >= limit:
                return


def evaluate_ppl(scorer: Scorer, task: Task, stride: int | None = None, limit: int | None = None,
                 advance=None) -> dict:
    requests, doc_of, words, nbytes, docs = [], [], 0, 0.0, 0
    texts_known = True
    for ids, text, size in _documents(task, scorer, limit):
        for window in rolling_windows(ids, scorer.prefix_token_id, scorer.max_length, stride):
            requests.append(window)
            doc_of.append(docs)
        docs += 1
        nbytes += size
        if text is None:
            texts_known = False
        else:
            words += len(re.split(r"\s+", text))  # lm-eval's count_words
    if not requests:
        raise GlmError(f"{task.source}: nothing to score")
    scores = scorer.loglikelihoods(requests, advance)
    nll = -sum(ll for ll, _ in scores)
    tokens = sum(len(cont) for _, cont in requests)
    metrics = {"cross_entropy": nll / tokens, "perplexity": math.exp(nll / tokens),
               "bits_per_byte": nll / (nbytes * math.log(2)), "byte_perplexity": math.exp(nll / nbytes)}
    if texts_known:
        metrics["word_perplexity"] = math.exp(nll / words)
    return {"n": docs, "tokens": tokens, "metrics": metrics}


def evaluate_mc(scorer: Scorer, task: Task, fewshot: list[dict] | None = None, num_fewshot: int = 0,
                seed: int = 1234, limit: int | None = None, advance=None) -> dict:
    records = task.records[:limit] if limit else task.records
    requests, owner = [], []
    for index, record in enumerate(records):
        prefix = fewshot_prefix(fewshot or [], "mc", num_fewshot, seed, index, record) if num_fewshot else ""
        for choice in record["choices"]:
            requests.append(scorer.encode_pair(prefix + record["context"], choice))
            owner.append(index)
    scores = scorer.loglikelihoods(requests, advance)
    acc = acc_norm = acc_bytes = 0.0
    predictions = []
    at = 0
    for record in records:
        lls = [ll for ll, _ in scores[at:at + len(record["choices"])]]
        at += len(record["choices"])
        chars = [len(c) for c in record["choices"]]
        nbytes = [len(c.encode("utf-8")) for c in record["choices"]]
        pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
        pred_norm = max(range(len(lls)), key=lambda i: (lls[i] / chars[i], -i))
        pred_bytes = max(range(len(lls)), key=lambda i: (lls[i] / nbytes[i], -i))
        acc += pred == record["gold"]
        acc_norm += pred_norm == record["gold"]
        acc_bytes += pred_bytes == record["gold"]
        predictions.append({"pred": pred, "pred_norm": pred_norm, "lls": lls})
    n = len(records)
    metrics = {"acc": acc / n, "acc_norm": acc_norm / n, "acc_bytes": acc_bytes / n}
    metrics["acc_stderr"] = math.sqrt(metrics["acc"] * (1 - metrics["acc"]) / max(n - 1, 1))
    return {"n": n, "metrics": metrics, "predictions": predictions}


def evaluate_gen(scorer: Scorer, task: Task, fewshot: list[dict] | None = None, num_fewshot: int = 0,
                 seed: int = 1234, limit: int | None = None, max_new_tokens: int = 32,
                 stop: list[str] | None = None, chat: bool = False, advance=None) -> dict:
    """Greedy completions; with `chat`, each prompt is sent as a user message in the chat template."""
    from glm_cli.core.eval.text_metrics import corpus_bleu, exact_match, rouge_l, token_f1
    from glm_cli.core.infer.generation import GenerationConfig, eos_ids_for, generate

    records = task.records[:limit] if limit else task.records
    stop = ["\n"] if stop is None else stop
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop=stop,
                              eos_ids=eos_ids_for(scorer.model.config, scorer.tokenizer, scorer.checkpoint_dir))
    encoder = None
    if chat:
        from glm_cli.core.tokens.chat_template import chat_encoder_for

        encoder = chat_encoder_for(scorer.checkpoint_dir, scorer.tokenizer)
        if encoder.end_id is not None:
            config.eos_ids = sorted(set(config.eos_ids) | {encoder.end_id})
    prompts = []
    for index, record in enumerate(records):
        prefix = fewshot_prefix(fewshot or [], "gen", num_fewshot, seed, index, record) if num_fewshot else ""
        if encoder is not None:
            ids = encoder.prompt_ids([{"role": "user", "content": prefix + record["prompt"]}])
        else:
            ids = scorer.encode(prefix + record["prompt"]) or [scorer.prefix_token_id]
        budget = scorer.model.config.max_seq_len - max_new_tokens
        prompts.append(ids[-budget:] if budget > 0 else ids[-1:])
    completions = []
    for start in range(0, len(prompts), scorer.batch_size):
        completions += generate(scorer.model, prompts[start:start + scorer.batch_size], config,
                                tokenizer=scorer.tokenizer)
        if advance is not None:
            advance(min(scorer.batch_size, len(prompts) - start))
    texts = [c.text.strip() for c in completions]
    references = [r["answers"] for r in records]
    n = len(records)
    metrics = {
        "exact_match": sum(exact_match(t, r) for t, r in zip(texts, references, strict=True)) / n,
        "f1": sum(token_f1(t, r) for t, r in zip(texts, references, strict=True)) / n,
        "rouge_l": sum(rouge_l(t, r) for t, r in zip(texts, references, strict=True)) / n,
        "bleu": corpus_bleu(texts, references),
    }
    return {"n": n, "metrics": metrics, "predictions": [{"completion": t} for t in texts]}


def evaluate_task(scorer: Scorer, task: Task, *, fewshot: list[dict] | None = None, num_fewshot: int = 0,
                  seed: int = 1234, limit: int | None = None, stride: int | None = None,
                  max_new_tokens: int = 32, stop: list[str] | None = None, chat: bool = False,
                  advance=None) -> dict:
    if task.type == "ppl":
        return evaluate_ppl(scorer, task, stride=stride, limit=limit, advance=advance)
    if task.type == "mc":
        return evaluate_mc(scorer, task, fewshot, num_fewshot, seed, limit, advance)
    return evaluate_gen(scorer, task, fewshot, num_fewshot, seed, limit, max_new_tokens, stop, chat, advance)


def task_size(task: Task, limit: int | None = None) -> int | None:
    """Units of progress for a task (requests or prompts), when known up front."""
    records = task.records[:limit] if limit else task.records
    if task.type == "mc":
        return sum(len(r["choices"]) for r in records)
    if task.type == "gen":
        return len(records)
    return None
