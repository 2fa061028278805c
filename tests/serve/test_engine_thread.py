"""One thread does all of a server's model work, and the HTTP side none: with a second thread entering
OpenMP parallel regions, libgomp stops spinning between regions and every decode step pays the wake-ups
(8 ms of a 5 ms step on 2 cores; see core/serve/engine.py). Timing would make a flaky test, so these check
the cause: which thread runs tensor operations."""

import threading

import pytest
from serve_fixtures import client_for, running_server, serve_root, tiny_ckpt  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("fastapi")
pytest.importorskip("openai")


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_building_a_request_runs_no_tensor_operation_until_the_engine_admits_it(tiny_ckpt):  # noqa: F811
    from glm_cli.core.serve.protocol import parse_request
    from glm_cli.core.serve.requests import Request

    with running_server(tiny_ckpt, slots=2) as server:
        state = server.state
        body = {"model": "ckpt", "prompt": "HAMLET. To be", "max_tokens": 4, "n": 2, "temperature": 0.7,
                "seed": 3, "logit_bias": {"5": -100}, "repetition_penalty": 1.2, "frequency_penalty": 0.5}
        with RecordOps() as http_side:  # what an HTTP handler does with a request
            parsed = parse_request(body, chat=False, model_name="ckpt", context=state.context, n_slots=state.n_slots,
                                   tokenizer=state.tokenizer, encoder=state.chat_encoder, vocab_size=state.vocab_size,
                                   bos_id=state.bos_id)
            request = Request(parsed.prompt, parsed.settings, lambda e: None, state.tokenizer.decode,
                              state.vocab_size, state.eos_ids)
        assert http_side.ops == []
        with RecordOps() as admission:  # what the engine then does on its own thread
            request.choices[0].start()
        assert admission.ops, "the recorder sees tensor operations (the test could fail)"
        assert request.choices[0].pipeline.bias[5] == -100


def test_the_thread_that_loads_the_model_runs_every_step(tiny_ckpt, monkeypatch):  # noqa: F811
    from glm_cli.core.serve import server as server_module
    from glm_cli.core.serve.engine import Engine

    loaded_on, stepped_on = [], set()
    real_load, real_step = server_module.load_engine, Engine.step

    def load(config, state):
        loaded_on.append(threading.get_ident())
        return real_load(config, state)

    def step(self):
        stepped_on.add(threading.get_ident())
        real_step(self)

    monkeypatch.setattr(server_module, "load_engine", load)
    monkeypatch.setattr(Engine, "step", step)
    with running_server(tiny_ckpt, slots=2) as server:
        out = client_for(server).completions.create(model="ckpt", prompt="HAMLET. To be", max_tokens=3,
                                                    temperature=0, logit_bias={"5": -100}, n=2)
        assert len(out.choices) == 2
    assert stepped_on == set(loaded_on) and threading.get_ident() not in stepped_on
