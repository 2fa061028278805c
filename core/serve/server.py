"""Putting the server together: load a checkpoint the way `glm generate` does, size the slot pool, start
the engine, and run the HTTP app with uvicorn.

The HTTP side starts first and answers GET /health with 503 while the model loads in a thread, so an
orchestrator can wait for readiness; a load that fails stops the server and is reported as one line. The
thread that loads the model then runs the engine: one thread does all the model's work (why, in
`core.serve.engine`).
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass
from pathlib import Path

from glm_cli.core.console import log, warn
from glm_cli.core.errors import GlmError, UsageError
from glm_cli.core.optional import require
from glm_cli.core.serve.state import ServerState


@dataclass(kw_only=True, slots=True)
class ServeConfig:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = 4
    """Sequences decoded together; each slot holds `context` tokens of KV cache."""
    context: int | None = None
    """Tokens per slot, prompt plus completion (unset: the model's context)."""
    max_queue: int = 64
    """Requests that may wait for a slot; more get 429 with Retry-After."""
    api_key: str | None = None
    prefill_chunk: int = 512
    """At most this many prompt tokens are prefilled per engine iteration."""
    device: str = "cpu"
    dtype: object = None
    model_name: str | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_engine(config: ServeConfig, state: ServerState):
    """Load the model and tokenizer, allocate the slot pool and make the engine (not started: the caller
    runs it, on this same thread); fills `state`."""
    import torch

    from glm_cli.core.infer.generation import eos_ids_for
    from glm_cli.core.infer.prepare import prepare_for_inference
    from glm_cli.core.load import load_with_adapter
    from glm_cli.core.serve.batched import check_servable
    from glm_cli.core.serve.engine import Engine
    from glm_cli.core.serve.slots import SlotPool
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    model = load_with_adapter(config.checkpoint, None, device=config.device, dtype=config.dtype)
    tokenizer = load_tokenizer(config.checkpoint)
    check_servable(model)
    context = check_context(model.config, config.context)
    prepared = prepare_for_inference(model)
    eos = eos_ids_for(model.config, tokenizer, config.checkpoint)
    try:
        from glm_cli.core.tokens.chat_template import chat_encoder_for

        encoder = chat_encoder_for(config.checkpoint, tokenizer)
        if encoder.end_id is not None and encoder.end_id not in eos:
            eos = sorted(eos + [encoder.end_id])
    except GlmError as e:
        encoder = None
        warn(f"/v1/chat/completions is off: {e}")
    dtype = next(model.parameters()).dtype if not prepared["native_decode"] else torch.float32
    pool = SlotPool(model.config, config.slots, context, dtype if dtype.is_floating_point else torch.float32,
                    config.device)
    engine = Engine(model, pool, max_queue=config.max_queue, prefill_chunk=config.prefill_chunk,
                    metrics=state.metrics)
    step = ("glm's native batched step" if getattr(model.fast_decode, "decode_rows", None) is not None else
            "glm's native one-row step" if prepared["native_decode"] else "the PyTorch batched step")
    log(f"{config.slots} slots of {context} tokens each: KV cache {pool.nbytes / 2**20:.1f} MiB "
        f"({pool.nbytes / config.slots / context / 1024:.1f} KiB a token); decoding with {step}")
    state.tokenizer, state.chat_encoder, state.eos_ids = tokenizer, encoder, eos
    state.vocab_size, state.bos_id = model.config.vocab_size, model.config.bos_token_id
    state.context, state.n_slots = context, config.slots
    state.engine = engine
    return engine


def check_context(model_config, context: int | None) -> int:
    limit = model_config.max_seq_len
    if model_config.sliding_window is not None:
        limit = min(limit, model_config.sliding_window)
    if context is None:
        return limit
    if context > limit:
        raise UsageError(f"--context {context}: the model attends over at most {limit} tokens")
    return context


class Server:
    """uvicorn running the app, with the model loading beside it. `run()` blocks; `start()` runs it in a
    thread (tests, benchmarks) and returns once it accepts connections; `stop()` ends either."""

    def __init__(self, config: ServeConfig):
        require("fastapi", "glm serve", "'glm-cli[serve]'")
        uvicorn = require("uvicorn", "glm serve", "'glm-cli[serve]'")
        from glm_cli.core.serve.app import create_app

        if not is_loopback(config.host) and not config.api_key:
            warn(f"binding {config.host} without --api-key: anyone who can reach this address can use the model")
        self.config = config
        name = config.model_name or Path(config.checkpoint).resolve().name
        self.state = ServerState(model_name=name, api_key=config.api_key)
        self.app = create_app(self.state)
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host=config.host, port=config.port,
                                                     log_level="warning", access_log=False, lifespan="off",
                                                     timeout_graceful_shutdown=2))
        self._engine_thread = threading.Thread(target=self._load_and_run, name="glm-serve-engine", daemon=True)
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _load_and_run(self) -> None:
        """Load the model, then run the engine on this same thread until the server stops."""
        try:
            engine = load_engine(self.config, self.state)
            import time

            deadline = time.monotonic() + 30
            while not self.uvicorn.started and not self.uvicorn.should_exit and time.monotonic() < deadline:
                time.sleep(0.02)
            log(f"serving {self.state.model_name} on {self.url}")
        except BaseException as e:  # reported by run(); the server stops
            self.error = e
            self.state.load_error = str(e)
            self.uvicorn.should_exit = True
            return
        # shutdown_engine sets _closing before it reads state.engine, and load_engine set state.engine
        # before this check: either the check sees _closing, or shutdown_engine sees the engine and stops it
        if not self._closing.is_set():
            engine.run()

    def run(self) -> None:
        self._engine_thread.start()
        try:
            self.uvicorn.run()
        finally:
            self.shutdown_engine()
        if self.error is not None:
            raise self.error if isinstance(self.error, GlmError) else GlmError(
                f"{self.config.checkpoint}: cannot serve it ({type(self.error).__name__}: {self.error})")

    def start(self, timeout: float = 60.0) -> Server:
        import time

        self._thread = threading.Thread(target=self.run_quietly, name="glm-serve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        if not self.uvicorn.started:
            raise GlmError(f"the server did not start on {self.config.host}:{self.config.port}")
        return self

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose when the config asked for 0)."""
        for server in getattr(self.uvicorn, "servers", []):
            for sock in server.sockets:
                return sock.getsockname()[1]
        return self.config.port

    @property
    def url(self) -> str:
        host = self.config.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def run_quietly(self) -> None:
        try:
            self.run()
        except BaseException as e:
            self.error = self.error or e

    def wait_ready(self, timeout: float = 120.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while self.state.engine is None and self.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.state.engine is None:
            raise GlmError(f"the model did not load: {self.error}")

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.shutdown_engine()

    def shutdown_engine(self) -> None:
        self._closing.set()
        if self.state.engine is not None:
            self.state.engine.stop()
        if self._engine_thread.is_alive():
            self._engine_thread.join(timeout=120)
        if self.state.engine is not None:  # loaded while we waited
            self.state.engine.stop()
