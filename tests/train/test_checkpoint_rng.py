"""The CUDA generators travel with the training state (safetensors, never pickle) and come back on resume.

No GPU here, so torch.cuda's five generator functions are replaced by CPU generators: their states are
uint8 tensors too (a CUDA generator's is 16 bytes of seed and offset, a CPU one's 5056 bytes), and what is
checked is glm's part: which states the checkpoint holds, that they survive the file byte for byte, and
that resume hands each one back to its device, so draws after the resume repeat the draws after the save.
"""

from __future__ import annotations

import pytest
import torch
from _pretrain_util import make_shards, run

from glm_cli.core.checkpoint.directory import load_tensors
from glm_cli.core.train import checkpointing
from glm_cli.core.train.checkpointing import STATE_DIR, restore_rng

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two 'devices' whose generators are CPU generators, behind torch.cuda's generator functions."""
    gens = [torch.Generator().manual_seed(100 + i) for i in range(2)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gens))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [g.get_state() for g in gens])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: gens[int(device)].set_state(state))
    return gens


def draws(gens) -> list[torch.Tensor]:
    return [torch.rand(8, generator=g) for g in gens]


def test_training_checkpoint_saves_and_resume_restores_every_cuda_generator(tmp_path, fake_cuda):
    shards = make_shards(tmp_path / "shards")
    draws(fake_cuda)  # the generators have moved on from their seeds before the checkpoint
    run(shards, tmp_path / "run", stop_at=2, max_steps=4, checkpoint_every=2, device="cpu")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    saved = load_tensors(checkpoint / STATE_DIR / "rng.safetensors")
    assert set(saved) == {"torch", "cuda0", "cuda1"}
    assert all(torch.equal(saved[f"cuda{i}"], g.get_state()) for i, g in enumerate(fake_cuda))
    after_save = draws(fake_cuda)

    draws(fake_cuda)  # e.g. a process that ran on and then died
    restore_rng(checkpoint)  # what Trainer.load does
    for got, want in zip(draws(fake_cuda), after_save, strict=True):
        assert torch.equal(got, want)


def test_fewer_devices_on_resume_restore_those_present_and_say_so(tmp_path, fake_cuda, monkeypatch):
    lines = []
    monkeypatch.setattr(checkpointing, "log", lines.append)
    states = {"torch": torch.get_rng_state(), "cuda0": fake_cuda[0].get_state(), "cuda1": fake_cuda[1].get_state()}
    from safetensors.torch import save_file

    (tmp_path / "ckpt" / STATE_DIR).mkdir(parents=True)
    save_file(states, str(tmp_path / "ckpt" / STATE_DIR / "rng.safetensors"))
    after = draws(fake_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    restore_rng(tmp_path / "ckpt")
    assert torch.equal(torch.rand(8, generator=fake_cuda[0]), after[0])
    assert len(lines) == 1 and "devices [1] not restored" in lines[0]


def test_a_process_that_never_used_cuda_saves_only_the_cpu_generator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("would initialize CUDA"))
    assert set(checkpointing._rng_state()) == {"torch"}
