"""The HTTP side: a fastapi app whose handlers check a request, queue it on the engine and stream back
what the engine reports. They never touch the model.

A handler waits on an asyncio queue the engine thread feeds (`loop.call_soon_threadsafe`); while it
waits it checks every `POLL_S` whether the client is still there, and when it is gone marks the request
cancelled, which frees its slots at the engine's next iteration.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm_cli.core.serve.protocol import ApiError, LogprobFormatter, new_id, now, parse_request
from glm_cli.core.serve.requests import Event
from glm_cli.core.serve.requests import Request as EngineRequest
from glm_cli.core.serve.state import ServerState

POLL_S = 0.1
RETRY_AFTER_S = 1


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="glm serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.glm = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        return error_response(ApiError(error.status_code, str(error.detail), code="not_found"
                                       if error.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        return error_response(ApiError(500, f"internal error: {type(error).__name__}: {error}"))

    def authorize(request: Request) -> None:
        """With --api-key, /v1/* and /metrics need 'Authorization: Bearer KEY' (a dependency rather than
        a middleware: starlette's middleware wrapper hides the client's disconnect from the handlers)."""
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    guarded = [Depends(authorize)]

    @app.get("/health")
    async def health():
        if state.engine is None:
            status = "error" if state.load_error else "loading"
            return JSONResponse({"status": status, **({"error": state.load_error} if state.load_error else {})},
                                status_code=503)
        engine = state.engine
        return {"status": "ok", "slots_total": state.n_slots, "slots_busy": engine.pool.in_use(),
                "queue_length": engine.queue_length(), "context_per_slot": state.context}

    @app.get("/metrics", dependencies=guarded)
    async def metrics():
        engine = state.engine
        busy, queued = (engine.pool.in_use(), engine.queue_length()) if engine is not None else (0, 0)
        return PlainTextResponse(state.metrics.render(queued, busy, state.n_slots),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "glm", "max_model_len": state.context}]}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(resources.files("glm_cli.core.serve").joinpath("chat.html").read_text(encoding="utf-8"))

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        return await _complete(state, request, chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        return await _complete(state, request, chat=True)

    return app


async def _read_json(state: ServerState, request: Request):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
        raise ApiError(413, f"the body is {declared} bytes; at most {state.max_body_bytes}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > state.max_body_bytes:
            raise ApiError(413, f"the body is over {state.max_body_bytes} bytes", code="body_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None


async def _complete(state: ServerState, http: Request, *, chat: bool):
    body = await _read_json(state, http)
    engine = state.engine
    if engine is None:
        raise ApiError(503, "the model is still loading", code="loading")
    parsed = parse_request(body, chat=chat, model_name=state.model_name, context=state.context,
                           n_slots=state.n_slots, tokenizer=state.tokenizer, encoder=state.chat_encoder,
                           vocab_size=state.vocab_size, bos_id=state.bos_id)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            request.cancelled = True

    decode = lambda ids: state.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    request = EngineRequest(parsed.prompt, parsed.settings, emit, decode, state.vocab_size, state.eos_ids)
    if not engine.submit(request):
        state.metrics.count("rejected")
        raise ApiError(429, f"the server is busy: {engine.max_queue} requests are already waiting; retry later",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    responder = _Responder(state, request, parsed, chat, events)
    if parsed.stream:
        return StreamingResponse(responder.stream(http), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await responder.whole(http)


class _Responder:
    """Turns one request's engine events into the API's response: whole, or as server-sent events."""

    def __init__(self, state: ServerState, request: EngineRequest, parsed, chat: bool, events: asyncio.Queue):
        self.state, self.request, self.parsed, self.chat, self.events = state, request, parsed, chat, events
        self.id, self.created = new_id(chat), now()
        self.logprobs = LogprobFormatter(state.tokenizer)
        self.checked = time.monotonic()

    async def _next(self, http: Request) -> Event | None:
        """The next event, or None once the client has gone (the request is then cancelled). The client is
        checked every POLL_S whether events flow or not."""
        while True:
            now_s = time.monotonic()
            if now_s - self.checked >= POLL_S:
                self.checked = now_s
                if await http.is_disconnected():
                    self.cancel()
                    return None
            try:
                return await asyncio.wait_for(self.events.get(), timeout=POLL_S)
            except asyncio.TimeoutError:
                continue

    def cancel(self) -> None:
        if not self.request.finished and not self.request.failed:
            self.request.cancelled = True
            self.state.engine.wake()

    async def whole(self, http: Request):
        n = self.request.settings.n
        texts, entries, reasons = [""] * n, [[] for _ in range(n)], [None] * n
        while True:
            event = await self._next(http)
            if event is None:
                return JSONResponse({}, status_code=499)
            if event.kind == "error":
                raise ApiError(500, event.message, code="engine_error")
            if event.kind == "delta":
                texts[event.index] += event.text
                entries[event.index] += event.logprobs
            elif event.kind == "finish":
                reasons[event.index] = event.finish_reason
            elif event.kind == "done":
                usage = event.usage
                break
        want = self.request.settings.logprobs is not None
        choices = []
        for i in range(n):
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": texts[i]},
                          "logprobs": {"content": self.logprobs.chat(entries[i])} if want else None,
                          "finish_reason": reasons[i]}
            else:
                choice = {"index": i, "text": texts[i],
                          "logprobs": self.logprobs.completion(entries[i], 0) if want else None,
                          "finish_reason": reasons[i]}
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.state.model_name, "choices": choices, "usage": usage}

    def _chunk(self, choices: list[dict], usage=None) -> str:
        payload = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                   "created": self.created, "model": self.state.model_name, "choices": choices}
        if self.parsed.include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def stream(self, http: Request):
        n = self.request.settings.n
        offsets = [0] * n
        want = self.request.settings.logprobs is not None
        done = False
        try:
            if self.chat:
                for i in range(n):
                    yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}])
            while True:
                event = await self._next(http)
                if event is None:
                    return
                if event.kind == "error":
                    yield f"data: {json.dumps(ApiError(500, event.message, code='engine_error').body())}\n\n"
                    done = True
                    return
                if event.kind == "delta":
                    if not event.text and not event.logprobs:
                        continue
                    i = event.index
                    if self.chat:
                        choice = {"index": i, "delta": {"content": event.text},
                                  "logprobs": {"content": self.logprobs.chat(event.logprobs)} if want else None,
                                  "finish_reason": None}
                    else:
                        choice = {"index": i, "text": event.text,
                                  "logprobs": self.logprobs.completion(event.logprobs, offsets[i]) if want else None,
                                  "finish_reason": None}
                    offsets[i] += len(event.text)
                    yield self._chunk([choice])
                elif event.kind == "finish":
                    key = "delta" if self.chat else "text"
                    empty = {} if self.chat else ""
                    yield self._chunk([{"index": event.index, key: empty, "logprobs": None,
                                        "finish_reason": event.finish_reason}])
                elif event.kind == "done":
                    if self.parsed.include_usage:
                        yield self._chunk([], usage=event.usage)
                    yield "data: [DONE]\n\n"
                    done = True
                    return
        finally:
            if not done:  # the client went away (or the server stops): free the slots
                self.cancel()
