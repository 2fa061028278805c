"""Instruction data for supervised fine-tuning: tokenized conversations, packed rows, a resumable cursor.

Each example is a rendered conversation (`glm_cli.core.tokens.chat`, or the model's own template through
`glm_cli.core.tokens.chat_template`); the model predicts token t+1 from tokens ..t, and the target is kept only
where token t+1 belongs to an assistant answer (-100 elsewhere), so the loss covers exactly the answers
(every assistant turn) and their end-of-turn marker (`<|end|>` in glm's format).

Packing puts several short examples into one row of `seq_len` tokens. Each row carries a segment id per
token; attention is causal *within* a segment only and positions restart at 0 for each segment, so a
packed example computes exactly what it would alone (tested: same logits). Training attends per segment
(`core.model.segments`, memory linear in the row); `collate` also builds the equivalent dense
block-diagonal mask, the reference it is tested against. Padding (segment -1) has no target.

Order: rows are built once (examples shuffled with the seed, then packed greedily); every epoch visits
the rows in a fresh seeded permutation. The cursor (epoch, position) is all the state there is, so a
resumed run continues with exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from glm_cli.core.errors import DataError
from glm_cli.core.io.corpus import read_records
from glm_cli.core.tokens.chat import messages_from_record

if TYPE_CHECKING:
    from glm_cli.core.tokens.chat import ChatEncoder
    from glm_cli.core.tokens.chat_template import TemplateChatEncoder

    ChatEncoderLike = ChatEncoder | TemplateChatEncoder

IGNORE = -100


@dataclass(slots=True)
class Example:
    inputs: list[int]
    targets: list[int]
    """Next-token targets, IGNORE where the next token is not part of an answer."""


def make_example(ids: list[int], mask: list[bool], max_len: int) -> Example | None:
    """Shift ids/mask into (inputs, targets) of at most max_len inputs; None if no answer token is left.

    A conversation too long for the window keeps its last answer: the window ends after the last answer
    token and the prompt is cut from the left (the usual truncation of instruction data).
    """
    if len(ids) > max_len + 1 and any(mask):
        end = max(i for i, m in enumerate(mask) if m) + 1
        start = max(0, end - (max_len + 1))
        ids, mask = ids[start:end], mask[start:end]
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    targets = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)]
    if all(t == IGNORE for t in targets):
        return None
    return Example(ids[:-1], targets)


def load_examples(path: str, encoder: ChatEncoderLike, max_len: int) -> tuple[list[Example], int]:
    """Read a JSONL file of conversations or prompt/response pairs; returns (examples, n dropped).

    Dropped examples are those with no answer token left in the window (an answer longer than it).
    """
    examples, dropped = [], 0
    for number, record in enumerate(read_records(path), start=1):
        messages = messages_from_record(record, path, number)
        try:
            rendered = encoder.render(messages)
        except DataError as e:  # the model's chat template refused this conversation
            raise DataError(path, number, e.reason) from None
        example = make_example(rendered.ids, rendered.mask, max_len)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    if not examples:
        raise DataError(path, 0, "no usable examples (empty file, or every answer lies beyond --seq-len)")
    return examples, dropped


ROW_CAP = 2048
"""Longest default row: beyond it, a packed row buys no speed (the matmuls are already large) and
its activations only cost memory."""
ROW_MULTIPLE = 64


def default_row_length(lengths: list[int], context: int, cap: int = ROW_CAP) -> tuple[int, str]:
    """The row length when --seq-len is not given, and why (for the log).

    The longest example rounded up to a multiple of 64, so every example fits whole and first-fit
    packing fills rows with the short ones; at most `cap` tokens and the model's context. Not the
    context itself: an 8k-context model fine-tuned on 50-token answers would otherwise pack hundreds
    of examples into rows whose activations (and, without segment attention, a T x T mask) fill memory
    for no gain in speed.
    """
    longest = max(lengths)
    rounded = -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE
    limit = min(cap, context)
    if rounded <= limit:
        return rounded, f"the longest example ({longest} tokens) rounded up to a multiple of {ROW_MULTIPLE}"
    if limit == context:
        return context, f"the model's context (the longest example has {longest} tokens)"
    return limit, (f"the longest example has {longest} tokens, more than the cap of {cap} per row "
                   "(longer examples keep their last answer)")


@dataclass(slots=True)
class Row:
    inputs: list[int]
    targets: list[int]
    positions: list[int]
    segments: list[int]


def pack(examples: list[Example], seq_len: int, packing: bool = True) -> list[Row]:
    """Greedy first-fit packing into rows of at most seq_len tokens (one example per row if not packing).

    Rows are not padded here; `collate` pads a batch to its longest row.
    """
    rows: list[Row] = []
    open_rows: list[Row] = []  # rows with room left (first-fit over a short list keeps this O(n * k))
    for ex in examples:
        n = len(ex.inputs)
        target = None
        if packing:
            for row in open_rows:
                if len(row.inputs) + n <= seq_len:
                    target = row
                    break
        if target is None:
            target = Row([], [], [], [])
            rows.append(target)
            if packing:
                open_rows.append(target)
                if len(open_rows) > 64:
                    open_rows.pop(0)
        segment = (target.segments[-1] + 1) if target.segments else 0
        target.inputs += ex.inputs
        target.targets += ex.targets
        target.positions += range(n)
        target.segments += [segment] * n
    return rows


def collate(rows: list[Row], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad rows to one length; build the block-diagonal causal mask (B, 1, T, T), True = may attend.

    The dense reference: training uses `collate_packed`, whose segment ids keep examples apart without
    a T x T mask (`core.model.segments`); both compute the same loss (tested)."""
    batch = collate_packed(rows, pad_id, length)
    batch["mask"] = segment_mask(batch.pop("segments"))
    return batch


def collate_packed(rows: list[Row], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad rows to one length: inputs, targets, positions and segment ids (B, T), -1 on padding."""
    T = length or max(len(r.inputs) for r in rows)
    B = len(rows)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.inputs)
        inputs[b, :n] = torch.tensor(r.inputs)
        targets[b, :n] = torch.tensor(r.targets)
        positions[b, :n] = torch.tensor(r.positions)
        segments[b, :n] = torch.tensor(r.segments)
    return {"input_ids": inputs, "targets": targets, "positions": positions, "segments": segments}


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool: same segment and not in the future; padding sees itself."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    eye = torch.eye(T, dtype=torch.bool, device=segments.device)
    return ((same & causal) | eye)[:, None]


class RowLoader:
    """Seeded epochs over packed rows (or any items, with `collate_fn`), sharded by rank, with an (epoch,
    position) cursor."""

    def __init__(self, rows: list, batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, collate_fn=None):
        if not rows:
            raise DataError("<data>", 0, "no rows to train on")
        self.rows, self.batch_size, self.pad_id, self.seed = rows, batch_size, pad_id, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.collate = collate_fn or (lambda items: collate_packed(items, pad_id))
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, []

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._order = order[self.rank::self.world_size] or order[:1]
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> dict[str, torch.Tensor]:
        order = self._epoch_order()
        if self.position >= len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self._epoch_order()
        picked = order[self.position:self.position + self.batch_size]
        self.position += len(picked)
        return self.collate([self.rows[i] for i in picked])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items
