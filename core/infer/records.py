"""Prompts in, completions out, as records: what `glm generate --prompts` runs, callable from a script.

    model, tokenizer = load_with_adapter(ckpt), load_tokenizer(ckpt)
    encode = prompt_encoder(tokenizer, model.config)
    counts = generate_records(model, tokenizer, read_prompt_records("prompts.jsonl"), "out.jsonl",
                              GenerationConfig(max_new_tokens=40), encode=encode)

A record is {"prompt": str} or {"messages": [...]} (chat), other fields (an id, say) are kept and the
completion, token counts and finish reason are added. Prompts run in batches of `batch_size`, each batch one
`generate` call; the output is written through the shared read -> steps -> write runner (`core.io.runner`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from glm_cli.core.errors import DataError, GlmError, UsageError
from glm_cli.core.infer.generation import GenerationConfig, generate
from glm_cli.core.io.corpus import RecordWriter, read_records
from glm_cli.core.io.runner import run_stages
from glm_cli.core.tokens.chat import check_messages


def read_prompt_records(path: str) -> list[dict]:
    """A prompts JSONL file ('-': stdin): {"prompt": str} or {"messages": [...]}, other fields kept."""
    if path != "-" and not Path(path).exists():
        raise GlmError(f"{path}: no such file")
    records = []
    for number, record in enumerate(read_records(path), start=1):
        if not isinstance(record.get("prompt"), str) and not isinstance(record.get("messages"), list):
            raise DataError(path, number, 'expected {"prompt": str} or {"messages": [...]}')
        if record.get("messages") is not None:
            check_messages(record["messages"], path, number)
        records.append(record)
    return records


def prompt_encoder(tokenizer, model_config, chat_encoder=None, system: str | None = None
                   ) -> Callable[[dict], list[int]]:
    """record -> prompt ids. With `chat_encoder` (`core.tokens.chat_template.chat_encoder_for`) a record's
    messages, or its prompt as one user turn, go through the chat template, `system` added in front when
    the record has no system turn; without it the prompt is encoded as plain text."""
    def encode(record: dict) -> list[int]:
        if chat_encoder is not None:
            messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
            if system and not any(m.get("role") == "system" for m in messages):
                messages = [{"role": "system", "content": system}] + messages
            return chat_encoder.prompt_ids(messages)
        if "prompt" not in record:
            raise UsageError("a {\"messages\": ...} prompt needs --chat")
        # The tokenizer's own post-processor adds what the model expects in front (Llama 3's BOS), as
        # `transformers` does for tokenizer(prompt); glm's tokenizers have none and add nothing.
        ids = tokenizer.encode(record["prompt"], add_special_tokens=True).ids
        return ids or [model_config.bos_token_id or 0]

    return encode


def generate_records(model: nn.Module, tokenizer, records: list[dict], output: str, config: GenerationConfig, *,
                     encode: Callable[[dict], list[int]] | None = None, batch_size: int = 8,
                     amateur: nn.Module | None = None, generator: torch.Generator | None = None,
                     source: str = "prompts", on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Complete every record and write it, with its completion, to `output` (JSONL, '-' for stdout, or any
    format `RecordWriter` writes). Returns the prompt count and the prompt and completion token totals.
    `source` names the records in errors (the chat template refusing record N says so);
    `on_batch(done, total)` is called after each batch."""
    if batch_size < 1:
        raise UsageError(f"batch_size {batch_size}: must be positive")
    encode = encode or prompt_encoder(tokenizer, model.config)
    counts = {"prompts": len(records), "prompt_tokens": 0, "completion_tokens": 0}

    def encode_at(record: dict, number: int) -> list[int]:
        try:
            return encode(record)
        except DataError as e:  # the chat template refused it: say which line
            raise DataError(source, number, e.reason) from None

    def completed() -> Iterator[list[tuple[dict, object]]]:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            ids = [encode_at(r, start + i + 1) for i, r in enumerate(batch)]
            results = generate(model, ids, config, tokenizer=tokenizer, amateur=amateur, generator=generator)
            yield list(zip(batch, results, strict=True))

    def write(batch, writer) -> int:
        for record, result in batch:
            writer.write({**record, "completion": result.text, "prompt_tokens": result.prompt_tokens,
                          "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason})
            counts["prompt_tokens"] += result.prompt_tokens
            counts["completion_tokens"] += result.completion_tokens
        done[0] += len(batch)
        if on_batch is not None:
            on_batch(done[0], len(records))
        return len(batch)

    done = [0]
    run_stages(completed(), write, writers=[RecordWriter(output)], label="generating")
    return counts
