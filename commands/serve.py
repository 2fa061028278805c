"""`glm serve`: an OpenAI-compatible HTTP server for a checkpoint, with continuous batching.

Example:
    glm serve runs/demo/finetune/final --slots 4 --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "final", "messages": [{"role": "user", "content": "Who is Hamlet?"}]}'
"""

from __future__ import annotations

from typing import Annotated

import typer

from glm_cli.commands._common import Quiet, flag_name
from glm_cli.commands._model_options import DeviceOpt, DtypeOpt, resolve_device_dtype
from glm_cli.core.field_docs import field_doc


def _doc(name: str) -> str:
    """The help of a flag that sets `ServeConfig.<name>`: the field's docstring, declared once in core."""
    return field_doc("glm_cli.core.serve.server", "ServeConfig", name, flags=flag_name)


def command(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint directory, as `glm generate` takes (glm, Hugging "
                                                   "Face Llama, a converted GGUF, int8/int4 quantized). Example: "
                                                   "glm serve runs/demo/finetune/final --slots 4")],
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback without "
                                      "--api-key prints a warning.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
    slots: Annotated[int, typer.Option("--slots", min=1, help=_doc("slots"))] = 4,
    context: Annotated[int | None, typer.Option("--context", min=2, help=_doc("context"))] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for the model "
                                                "(default: PyTorch's choice).")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="GLM_API_KEY", help="Require "
                                                "'Authorization: Bearer KEY' on /v1/* and /metrics.")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help=_doc("max_queue"))] = 64,
    model_name: Annotated[str | None, typer.Option("--model-name", help="The model id clients send "
                                                   "(default: the checkpoint directory's name).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quiet: Quiet = False,
) -> None:
    """Serve a checkpoint over the OpenAI HTTP API (completions, chat, streaming) with a chat page at /.

    Example: glm serve runs/demo/finetune/final --slots 4 --port 8000
    """
    import torch

    from glm_cli.core.console import set_quiet
    from glm_cli.core.serve.server import ServeConfig, Server

    set_quiet(quiet)
    device, torch_dtype = resolve_device_dtype(device, dtype)
    if threads is not None:
        torch.set_num_threads(threads)
    config = ServeConfig(checkpoint=checkpoint, host=host, port=port, slots=slots, context=context,
                         max_queue=max_queue, api_key=api_key, device=device, dtype=torch_dtype,
                         model_name=model_name)
    Server(config).run()
