"""What keeps a server up for others: cancellation of clients that go away, the bounded queue (429),
the API key, readiness while loading, and the command run as a user runs it."""

import re
import subprocess
import sys
import threading
import time

import pytest
from serve_fixtures import client_for, http, running_server, serve_root, tiny_ckpt, wait_until  # noqa: F401

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

STEP_DELAY_S = 0.02


def slow_down(server, delay: float = STEP_DELAY_S) -> None:
    """Make every engine iteration last at least `delay`, so a request runs long enough to give up on."""
    engine = server.state.engine
    step = engine.step

    def slowed():
        time.sleep(delay)
        step()

    engine.step = slowed


def give_up(server, *, stream: bool, timeout: float, max_tokens: int = 100) -> str:
    """A client that waits `timeout` seconds and goes away; returns what happened to it."""
    client = client_for(server, timeout=timeout)
    try:
        r = client.completions.create(model="ckpt", prompt="HAMLET. To be", max_tokens=max_tokens, temperature=0,
                                      stream=stream)
        if stream:
            for _ in r:
                pass
        return "finished"
    except openai.APITimeoutError:
        return "timed out"


def test_clients_that_go_away_free_their_slots(tiny_ckpt):  # noqa: F811
    with running_server(tiny_ckpt, slots=2) as server:
        slow_down(server)
        engine = server.state.engine
        outcomes = []
        threads = [threading.Thread(target=lambda s=stream: outcomes.append(give_up(server, stream=s, timeout=0.4)))
                   for stream in (True, False, True, False)]  # 4 clients on 2 slots: 2 wait in the queue
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert outcomes == ["timed out"] * 4
        # 100 tokens at >= 20 ms each would hold the slots for 2 s more; they are free within a few steps
        wait_until(lambda: engine.pool.in_use() == 0 and engine.queue_length() == 0, timeout=1.5,
                   what="every slot free and the queue empty")
        assert server.state.metrics.requests["cancelled"] == 4
        started = time.monotonic()
        fresh = client_for(server).completions.create(model="ckpt", prompt="Who speaks?", max_tokens=5, temperature=0)
        assert fresh.usage.completion_tokens + (fresh.choices[0].finish_reason == "stop") >= 1
        assert time.monotonic() - started < 2.0


def test_a_full_queue_answers_429_with_retry_after(tiny_ckpt):  # noqa: F811
    with running_server(tiny_ckpt, slots=1, max_queue=1) as server:
        slow_down(server)
        engine = server.state.engine
        waiting = [threading.Thread(target=give_up, args=(server,), kwargs={"stream": True, "timeout": 2.0})
                   for _ in range(2)]
        waiting[0].start()
        wait_until(lambda: engine.pool.in_use() == 1, timeout=5, what="the slot taken")
        waiting[1].start()
        wait_until(lambda: engine.queue_length() == 1, timeout=5, what="one request queued")
        r = http("POST", f"{server.url}/v1/completions", {"model": "ckpt", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client_for(server).completions.create(model="ckpt", prompt="x", max_tokens=2)
        for t in waiting:
            t.join(timeout=10)
        wait_until(lambda: engine.pool.in_use() == 0 and engine.queue_length() == 0, timeout=2, what="drained")
        assert client_for(server).completions.create(model="ckpt", prompt="x", max_tokens=2).choices
        assert server.state.metrics.requests["rejected"] == 2


def test_api_key_is_required_on_the_api(tiny_ckpt):  # noqa: F811
    with running_server(tiny_ckpt, slots=1, api_key="sekret") as server:
        body = {"model": "ckpt", "prompt": "x", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = http("POST", f"{server.url}/v1/completions", body, headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http("GET", f"{server.url}/metrics").status_code == 401
        assert http("GET", f"{server.url}/v1/models").status_code == 401
        assert http("GET", f"{server.url}/health").status_code == 200  # readiness probes need no key
        with pytest.raises(openai.AuthenticationError):
            client_for(server, api_key="wrong").models.list()
        ok = client_for(server, api_key="sekret").completions.create(model="ckpt", prompt="x", max_tokens=2)
        assert ok.usage.prompt_tokens >= 1


def test_binding_a_public_address_without_a_key_warns(tiny_ckpt, capfd):  # noqa: F811
    from glm_cli.core.serve.server import ServeConfig, Server, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    Server(ServeConfig(checkpoint=str(tiny_ckpt), host="0.0.0.0"))  # built, never started
    assert "without --api-key" in capfd.readouterr().err
    Server(ServeConfig(checkpoint=str(tiny_ckpt), host="0.0.0.0", api_key="k"))
    Server(ServeConfig(checkpoint=str(tiny_ckpt), host="127.0.0.1"))
    assert "without --api-key" not in capfd.readouterr().err


def test_health_is_503_while_the_model_loads(tiny_ckpt, monkeypatch):  # noqa: F811
    from glm_cli.core.serve import server as server_module

    release = threading.Event()
    real = server_module.load_engine

    def slow_load(config, state):
        assert release.wait(timeout=20)
        return real(config, state)

    monkeypatch.setattr(server_module, "load_engine", slow_load)
    server = server_module.Server(server_module.ServeConfig(checkpoint=str(tiny_ckpt), port=0, slots=1))
    try:
        server.start(timeout=30)
        health = http("GET", f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        early = http("POST", f"{server.url}/v1/completions", {"model": "ckpt", "prompt": "x", "max_tokens": 2})
        assert early.status_code == 503 and early.json()["error"]["code"] == "loading"
        release.set()
        server.wait_ready(timeout=30)
        assert http("GET", f"{server.url}/health").status_code == 200
    finally:
        release.set()
        server.stop()


def test_the_command_serves_and_reports_bad_settings_in_one_line(tiny_ckpt):  # noqa: F811
    proc = subprocess.Popen([sys.executable, "-m", "glm_cli", "serve", str(tiny_ckpt), "--port", "0", "--slots", "2",
                             "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        url, lines = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"serving ckpt on (http://127\.0\.0\.1:\d+)", line)
            url = found.group(1) if found else None
        assert url, "".join(lines)
        assert any("2 slots of 128 tokens each" in line for line in lines)
        r = http("POST", f"{url}/v1/completions", {"model": "ckpt", "prompt": "HAMLET.", "max_tokens": 3,
                                                   "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # bad settings, in this process (a subprocess costs a torch import): the errors the CLI prints in one line
    from conftest import invoke_glm

    from glm_cli.core.errors import CheckpointError, UsageError

    code, _, error = invoke_glm("serve", tiny_ckpt, "--port", "0", "--context", "4096")
    assert isinstance(error, UsageError) and "--context 4096" in str(error) and "\n" not in str(error)
    code, _, error = invoke_glm("serve", tiny_ckpt.parent / "nope", "--port", "0")
    assert isinstance(error, CheckpointError) and "nope" in str(error)


def test_an_engine_failure_fails_the_requests_in_flight_not_the_server(tiny_ckpt, monkeypatch):  # noqa: F811
    from glm_cli.core.serve import engine as engine_module

    real = engine_module.decode_logits
    calls = {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "decode_logits", failing_once)
    with running_server(tiny_ckpt, slots=2) as server:
        body = {"model": "ckpt", "prompt": "HAMLET.", "max_tokens": 5, "temperature": 0}
        failed = http("POST", f"{server.url}/v1/completions", body)
        assert failed.status_code == 500 and "simulated kernel failure" in failed.json()["error"]["message"]
        assert server.state.engine.pool.in_use() == 0
        ok = http("POST", f"{server.url}/v1/completions", body)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert server.state.metrics.requests["error"] == 1


def test_without_the_serve_extra_the_command_names_the_install(tiny_ckpt, monkeypatch):  # noqa: F811
    from glm_cli.core.errors import GlmError
    from glm_cli.core.serve.server import ServeConfig, Server

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now raises ImportError
    with pytest.raises(GlmError, match=r"pip install 'glm-cli\[serve\]'"):
        Server(ServeConfig(checkpoint=str(tiny_ckpt)))
