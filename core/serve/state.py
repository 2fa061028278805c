"""What the HTTP handlers share: the engine once the model is loaded, and what they need to check and
encode a request. Kept apart from `app` so the server can be set up without importing fastapi first."""

from __future__ import annotations

from dataclasses import dataclass, field

from glm_cli.core.serve.metrics import Metrics
from glm_cli.core.serve.protocol import now


@dataclass
class ServerState:
    """What the handlers need; `engine` is None while the model loads (GET /health answers 503 then)."""
    model_name: str
    max_body_bytes: int = 4 << 20
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    engine: object | None = None
    tokenizer: object | None = None
    chat_encoder: object | None = None
    eos_ids: list[int] = field(default_factory=list)
    vocab_size: int = 0
    bos_id: int | None = None
    context: int = 0
    n_slots: int = 0
    created: int = field(default_factory=now)
    load_error: str | None = None
