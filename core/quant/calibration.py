"""Token data for quantization: calibration windows and a held-out perplexity.

Data comes either from a token-shard directory (`glm tokenize encode` output; calibration reads its train
split, evaluation its val split) or from corpus files (text/JSONL, read with `core.io.corpus`) encoded with the
checkpoint's tokenizer, each document followed by `<|endoftext|>`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from glm_cli.core.errors import UsageError
from glm_cli.core.tokens.tokenizer import ENDOFTEXT


def is_shard_dir(spec: str) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "index.json").exists()


def is_shard_spec(specs: list[str] | None) -> bool:
    """True when the data is one token-shard directory (it has a train and a val split)."""
    return bool(specs) and len(specs) == 1 and is_shard_dir(specs[0])


def token_stream(specs: list[str], tokenizer_dir: str | Path | None, split: str, max_tokens: int) -> np.ndarray:
    """Up to max_tokens token ids (int64) from a shard dir (split) or from corpus files."""
    if is_shard_spec(specs):
        from glm_cli.core.io.shards import ShardSet

        shards = ShardSet(specs[0], split)
        if not len(shards):
            raise UsageError(f"{specs[0]}: no '{split}' shards")
        parts, total = [], 0
        for array in shards.arrays:
            take = array[: max_tokens - total]
            parts.append(np.asarray(take, dtype=np.int64))
            total += len(take)
            if total >= max_tokens:
                break
        return np.concatenate(parts)
    from glm_cli.core.io.corpus import read_documents
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    if tokenizer_dir is None:
        raise UsageError("encoding a text corpus needs a tokenizer (the checkpoint has no tokenizer.json)")
    tokenizer = load_tokenizer(tokenizer_dir)
    eot = tokenizer.token_to_id(ENDOFTEXT)
    ids: list[int] = []
    for doc in read_documents(specs):
        ids.extend(tokenizer.encode(doc.text).ids)
        if eot is not None:
            ids.append(eot)
        if len(ids) >= max_tokens:
            break
    if not ids:
        raise UsageError(f"{' '.join(specs)}: no text to read")
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def calibration_batches(tokens: np.ndarray, samples: int, seq_len: int, batch_size: int = 8,
                        seed: int = 0) -> list[torch.Tensor]:
    """`samples` random windows of seq_len tokens (fewer if the stream is short), batched."""
    if len(tokens) < seq_len + 1:
        seq_len = len(tokens) - 1
        if seq_len < 8:
            raise UsageError(f"calibration data has only {len(tokens)} tokens; need at least 9")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq_len + 1, size=samples)
    windows = torch.from_numpy(np.stack([tokens[s:s + seq_len] for s in starts]))
    return list(windows.split(batch_size))


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int = 8) -> dict:
    """Perplexity over non-overlapping windows of seq_len + 1 tokens (every target predicted once)."""
    span = seq_len + 1
    n_windows = len(tokens) // span
    if n_windows == 0:
        raise UsageError(f"evaluation data has only {len(tokens)} tokens; need at least {span}")
    windows = torch.from_numpy(tokens[: n_windows * span].reshape(n_windows, span))
    total_nll, count = 0.0, 0
    model.eval()
    for batch in windows.split(batch_size):
        logits = model(batch[:, :-1])
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += nll.item()
        count += batch[:, 1:].numel()
    loss = total_nll / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
