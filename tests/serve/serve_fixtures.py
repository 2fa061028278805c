"""Fixtures of the server tests: a tiny checkpoint (and its int8/int4 quantizations by `glm quantize`), and
servers started in this process on 127.0.0.1 with a port the OS picks, always stopped afterwards."""

import contextlib
import time

import pytest
from conftest import invoke_glm
from eval_fixtures import make_checkpoint

PROMPTS = ["HAMLET. To be", "Who speaks?", "OTHELLO. Put up your", "MACBETH. Is this a", "Out, damned",
           "Which play?", "Good my lord, how", "LADY MACBETH. Out"]


@pytest.fixture(scope="session")
def serve_root(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="session")
def tiny_ckpt(serve_root):
    return make_checkpoint(serve_root / "ckpt")


@pytest.fixture(scope="session")
def quantized_ckpts(serve_root, tiny_ckpt):
    """{8: int8 dir, 4: int4 dir}, made by `glm quantize` (round to nearest)."""
    out = {}
    for bits, extra in ((8, []), (4, ["--group-size", "64"])):
        target = serve_root / f"q{bits}"
        code, _, error = invoke_glm("quantize", tiny_ckpt, "-o", target, "--bits", bits, *extra)
        assert code == 0 and error is None, error
        out[bits] = target
    return out


@contextlib.contextmanager
def running_server(checkpoint, **settings):
    """A `glm serve` server in this process on 127.0.0.1, ready to answer; stopped on exit. One intra-op
    thread: on 2 shared cores more threads oversubscribe and a tiny step stalls for milliseconds."""
    import torch

    from glm_cli.core.serve.server import ServeConfig, Server

    settings.setdefault("slots", 4)
    server = Server(ServeConfig(checkpoint=str(checkpoint), host="127.0.0.1", port=0, **settings))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        server.start(timeout=30)
        server.wait_ready(timeout=60)
        yield server
    finally:
        server.stop()
        torch.set_num_threads(threads)


def client_for(server, **kwargs):
    import openai

    kwargs.setdefault("api_key", "none")
    kwargs.setdefault("timeout", 30)
    return openai.OpenAI(base_url=f"{server.url}/v1", max_retries=0, **kwargs)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Reply:
    def __init__(self, status: int, headers, body: bytes):
        self.status_code, self.headers, self.content = status, headers, body

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        import json

        return json.loads(self.content)


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None,
         timeout: float = 10.0) -> Reply:
    """A raw HTTP request (the openai client refuses to send some of the bad requests tested here)."""
    import json
    import urllib.error
    import urllib.request

    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return Reply(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.headers, e.read())
