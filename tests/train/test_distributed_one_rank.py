"""One process under torchrun (WORLD_SIZE=1) really runs DDP or FSDP2, on gloo: a one-rank process group
and device mesh, DTensor parameters under FSDP2, an FSDP2 checkpoint that resumes exactly, and the run's
report saying which mode ran.

The in-process tests set the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so
the trainer joins the group through the env:// rendezvous a torchrun child uses, and one test runs the
command `glm pretrain --fsdp --json` in that environment. One rank sums its gradients with nobody, so
DDP and FSDP2 match the plain run exactly here.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _pretrain_util import losses, make_shards, run

from glm_cli.core.checkpoint.directory import load_tensors
from glm_cli.core.train import optimizer as opt_module

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.usefixtures("one_thread")]

STEPS, STOP = 5, 3
KW = dict(max_steps=STEPS, task_kw=dict(micro_batch_size=2), grad_accum=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun_one(monkeypatch):
    """Call before each run: the environment of torchrun's only child, on a fresh port (`launch(False)`:
    a plain run's environment)."""
    def launch(under_torchrun: bool = True):
        for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(_free_port())).items():
            if under_torchrun:
                monkeypatch.setenv(name, value)
            else:
                monkeypatch.delenv(name, raising=False)
    launch(False)
    yield launch
    assert not dist.is_initialized(), "the trainer left its process group behind"


def _dtensor_parameters(model) -> bool:
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return bool(params) and all(isinstance(p, DTensor) for p in params)


def test_fsdp2_on_one_rank_shards_and_its_checkpoint_resumes_exactly(shards, tmp_path, torchrun_one):
    torchrun_one()
    whole, trainer = run(shards, tmp_path / "whole", parallel="fsdp", checkpoint_every=STOP, **KW)
    assert (whole.parallel, whole.world_size) == ("fsdp", 1)
    assert _dtensor_parameters(trainer.model)
    exp_avg = [s["exp_avg"] for s in trainer.optimizer.state.values()]
    assert exp_avg and all(type(t).__name__ == "DTensor" for t in exp_avg)
    assert json.loads((tmp_path / "whole" / "run.json").read_text())["parallel"] == "fsdp"
    summary = json.loads((tmp_path / "whole" / "final" / "train_summary.json").read_text())
    assert (summary["parallel"], summary["world_size"]) == ("fsdp", 1)

    torchrun_one()
    paused, _ = run(shards, tmp_path / "split", parallel="fsdp", stop_at=STOP, checkpoint_every=STOP, **KW)
    assert paused.step == STOP
    torchrun_one()
    resumed, trainer = run(shards, tmp_path / "split", parallel="fsdp", resume=True, **KW)
    assert resumed.step == STEPS and _dtensor_parameters(trainer.model)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # bitwise
    a, b = (load_tensors(tmp_path / d / "final" / "model.safetensors") for d in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    torchrun_one(False)
    plain, _ = run(shards, tmp_path / "plain", **KW)  # no torchrun: no group, no wrapping
    assert plain.parallel == "none"
    np.testing.assert_array_equal(losses(tmp_path / "plain"), losses(tmp_path / "whole"))


def test_torchrun_alone_means_ddp_on_one_rank(shards, tmp_path, torchrun_one):
    from torch.nn.parallel import DistributedDataParallel

    torchrun_one()
    result, trainer = run(shards, tmp_path / "ddp", **KW)
    assert (result.parallel, result.world_size) == ("ddp", 1)
    assert isinstance(trainer.model, DistributedDataParallel)
    torchrun_one(False)
    plain, _ = run(shards, tmp_path / "plain", **KW)
    assert losses(tmp_path / "ddp") == losses(tmp_path / "plain")


def test_fsdp_asked_in_a_plain_run_makes_its_own_one_rank_group(shards, tmp_path, torchrun_one):
    assert not dist.is_initialized()
    result, trainer = run(shards, tmp_path / "r", parallel="fsdp", max_steps=2)
    assert result.parallel == "fsdp" and _dtensor_parameters(trainer.model)
    assert not dist.is_initialized()


def test_fused_adamw_steps_dtensor_parameters(shards, tmp_path, torchrun_one, monkeypatch):
    """AdamW(fused=True) is chosen on CUDA only; forced here, its CPU kernel steps FSDP2's DTensors (the
    CUDA kernel is the GPU check's), and a resume restores its state."""
    assert not opt_module.use_fused_adamw(torch.device("cpu"))
    assert opt_module.use_fused_adamw(torch.device("cuda", 0))
    torchrun_one()
    run(shards, tmp_path / "foreach", parallel="fsdp", **KW)
    monkeypatch.setattr(opt_module, "use_fused_adamw", lambda device: True)
    torchrun_one()
    _, trainer = run(shards, tmp_path / "fused", parallel="fsdp", stop_at=STOP, checkpoint_every=STOP, **KW)
    assert all(g.get("fused") for g in trainer.optimizer.param_groups) and _dtensor_parameters(trainer.model)
    torchrun_one()
    run(shards, tmp_path / "fused", parallel="fsdp", resume=True, **KW)
    np.testing.assert_allclose(losses(tmp_path / "fused"), losses(tmp_path / "foreach"), rtol=1e-5)


def test_cli_under_torchrun_one_process_fsdp_reports_the_mode(shards, tmp_path, torchrun_one, capsys):
    """`torchrun --nproc_per_node 1 -m glm_cli pretrain --fsdp --json`, in this process: the environment
    torchrun gives its child, then the command itself (a subprocess would add ~25 s of imports here)."""
    from conftest import glm_stdout

    torchrun_one()
    out = glm_stdout("pretrain", shards, "-o", tmp_path / "run", "--preset", "tiny", "--set", "max_seq_len=32",
                     "-b", "2", "--max-steps", "2", "--eval-every", "0", "--set", "peak_flops=1e11",
                     "--device", "cpu", "--fsdp", "--json")
    summary = json.loads(out)
    assert (summary["parallel"], summary["world_size"], summary["step"]) == ("fsdp", 1, 2)
