"""The validation split of finetune and align: a given file, or a share held out of the training data.

SFT examples, preference pairs and PPO prompts are all split the same way, so `--val-fraction` means the
same in every command: the items are shuffled with the run's seed and the first share (rounded down) is
held out, so the same data and seed always hold out the same items.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TypeVar

Item = TypeVar("Item")


def hold_out(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(train, validation): `items` shuffled with `seed`, the first int(len * fraction) held out."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_val = int(len(items) * fraction)
    return items[n_val:], items[:n_val]


def validation_split(items: list[Item], val_path: str | None, load: Callable[[str], list[Item]], fraction: float,
                     seed: int) -> tuple[list[Item], list[Item]]:
    """(train, validation): `items` and `load(val_path)` when a validation file is given (the training
    items keep their order), else `hold_out(items, fraction, seed)`."""
    if val_path:
        return items, load(val_path)
    return hold_out(items, fraction, seed)
