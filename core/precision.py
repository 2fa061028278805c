"""The names `--dtype` accepts, the same in every command.

Training has always said bf16/fp32 and the inference commands float32/bfloat16; a user should not have to
remember which command spells it which way, so every command takes both spellings and each refuses, in
one line, the precisions it cannot run (training has no fp16 loss scaling, say). Nothing here imports
torch: the names are checked before any model is built.
"""

from __future__ import annotations

from glm_cli.core.errors import UsageError

# Every spelling, to the torch name (`getattr(torch, name)`); "auto" lets the command decide.
NAMES = {"auto": "auto", "fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
         "fp16": "float16", "float16": "float16"}
SHORT = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
ALL = ("auto", "float32", "bfloat16", "float16")


def dtype_help(auto: str) -> str:
    """The --dtype help of every command; `auto` says what auto means there."""
    return f"Precision: auto ({auto}), fp32, bf16 or fp16 (or float32, bfloat16, float16)."


def canonical(value: str) -> str | None:
    """The torch name of any accepted spelling, or None."""
    return NAMES.get(str(value).strip().lower())


def parse_dtype(value: str, supported: tuple[str, ...] = ALL, why: str = "") -> str:
    """The torch name ("float32", ...) or "auto"; a UsageError naming the choices otherwise.

    `supported` is what this command can run and `why` the reason for refusing the others."""
    name = canonical(value)
    choices = ", ".join(SHORT[s] for s in supported)
    if name is None:
        raise UsageError(f"--dtype {value!r}: choose {choices} (float32, bfloat16 and float16 also work)")
    if name not in supported:
        raise UsageError(f"--dtype {value}: {why or 'not supported by this command'}; choose {choices}")
    return name
