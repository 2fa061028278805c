"""Two gloo processes on the CPU: DDP and FSDP2 match one process with the same global batch, and a
checkpoint written by two processes resumes on one.

Tolerance: the same samples go through the same math, but the gradient all-reduce sums in another
order than one process's batch reduction, so losses agree to float32 rounding (rtol 1e-5), not bitwise.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _pretrain_util import losses, make_shards, run

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.usefixtures("one_thread")]

STEPS, STOP = 6, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, shards: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from pathlib import Path

        # DDP, stopped at STOP: its checkpoint is resumed by one process below
        run(Path(shards), Path(out) / "ddp", stop_at=STOP, max_steps=STEPS, task_kw=dict(micro_batch_size=2),
            grad_accum=2, checkpoint_every=STOP)
        # FSDP2 (fully_shard per block + root), the whole run, with an evaluation in the middle
        run(Path(shards), Path(out) / "fsdp", max_steps=STEPS, eval_every=STOP, parallel="fsdp",
            task_kw=dict(micro_batch_size=2), grad_accum=2)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    shards = make_shards(root / "shards")
    mp.start_processes(_worker, args=(2, _free_port(), str(shards), str(root)), nprocs=2, join=True,
                       start_method="spawn")
    return root, shards


def test_ddp_and_fsdp_match_one_process_and_resume_on_one(two_process_runs):
    root, shards = two_process_runs
    # one process, micro-batch 4 = 2 processes x 2: the same global batch
    run(shards, root / "single", max_steps=STEPS, eval_every=STOP, task_kw=dict(micro_batch_size=4), grad_accum=2)
    single = losses(root / "single")
    assert len(single) == STEPS

    ddp = losses(root / "ddp")
    assert len(ddp) == STOP
    np.testing.assert_allclose(ddp, single[:STOP], rtol=1e-5)

    fsdp = losses(root / "fsdp")
    np.testing.assert_allclose(fsdp, single, rtol=1e-5)

    # the 2-process checkpoint (world size recorded as 2) resumes in one process and finishes the run
    result, _ = run(shards, root / "ddp", resume=True, max_steps=STEPS, task_kw=dict(micro_batch_size=4),
                    grad_accum=2)
    assert result.step == STEPS
    np.testing.assert_allclose(losses(root / "ddp"), single, rtol=1e-5)
    from glm_cli.core.checkpoint.directory import load_tensors

    a = load_tensors(root / "single" / "final" / "model.safetensors")
    for name, t in load_tensors(root / "fsdp" / "final" / "model.safetensors").items():
        torch.testing.assert_close(t, a[name], rtol=1e-4, atol=1e-5)
