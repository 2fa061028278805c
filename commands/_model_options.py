"""The options of the commands that run a trained model (`glm generate`, `glm eval`): where it runs and in
what precision, parsed the same way in both."""

from __future__ import annotations

from typing import Annotated

import typer

from glm_cli.core.precision import dtype_help, parse_dtype

DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (cuda when available).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help=dtype_help("bf16 on GPU, fp32 on CPU"))]


def resolve_device_dtype(device: str, dtype: str):
    """(device, torch dtype) from the two options: `auto` picks CUDA when there is one, and bf16 there
    (fp32 on CPU, where bf16 matmuls are slow); a CUDA device without CUDA is a usage error, not a crash
    at the first tensor."""
    import torch

    from glm_cli.core.errors import UsageError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    dtype = parse_dtype(dtype)
    if dtype == "auto":
        return device, (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return device, getattr(torch, dtype)
