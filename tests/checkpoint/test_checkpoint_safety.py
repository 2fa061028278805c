"""Checkpoints under attack: a kill mid-write, a flipped byte, pickle payloads, hostile safetensors headers."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _pretrain_util import losses, make_shards, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm_cli.core.checkpoint.directory import load_tensors, save_tensors
from glm_cli.core.checkpoint.loader import load_model
from glm_cli.core.errors import CheckpointError
from glm_cli.core.train.checkpointing import latest_checkpoint

TESTS = Path(__file__).resolve().parents[1]  # tests/, where the shared helpers live


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def test_kill_during_checkpoint_write_leaves_previous_checkpoint(shards, tmp_path):
    """SIGKILL while the step-4 checkpoint is half written: --resume picks step 2 and the run finishes
    with the same losses as an uninterrupted one."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(TESTS)!r})
        import torch; torch.set_num_threads(1)
        import glm_cli.core.checkpoint.directory as ck
        from _pretrain_util import run
        real = ck.save_tensors
        def dying(path, tensors, metadata=None):
            real(path, tensors, metadata)
            if "step-000004" in str(path) and "optimizer" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)   # the checkpoint dir is half written
        ck.save_tensors = dying
        run(__import__("pathlib").Path({str(shards)!r}), __import__("pathlib").Path({str(tmp_path / "run")!r}),
            max_steps=6, checkpoint_every=2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env={"OMP_NUM_THREADS": "1",
                          "PATH": "/usr/bin:/bin"})
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert any(p.name.startswith(".tmp-step-000004") for p in ckpts.iterdir())  # the torn write is there
    assert latest_checkpoint(tmp_path / "run").name == "step-000002"
    result, _ = run(shards, tmp_path / "run", resume=True, max_steps=6, checkpoint_every=2)
    assert result.step == 6
    run(shards, tmp_path / "clean", max_steps=6, checkpoint_every=2)
    assert losses(tmp_path / "run") == losses(tmp_path / "clean")


@pytest.mark.parametrize("victim", ["model.safetensors", "training_state/optimizer.safetensors",
                                    "training_state/state.json"])
def test_flipped_byte_fails_loudly_on_resume(shards, tmp_path, victim):
    run(shards, tmp_path / "run", max_steps=2)
    path = latest_checkpoint(tmp_path / "run") / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        run(shards, tmp_path / "run", resume=True, max_steps=4)


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payloads_are_never_executed(shards, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    for name in ("weights.pt", "pytorch_model.bin", "state.pkl"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match="pickle"):
            load_tensors(tmp_path / name)
    # a checkpoint directory holding only pickle weights
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "pytorch_model.bin").write_bytes(payload)
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(ckpt)
    # a pickle disguised as the optimizer state of a training checkpoint (checksums updated to match)
    run(shards, tmp_path / "run", max_steps=2)
    last = latest_checkpoint(tmp_path / "run")
    (last / "training_state" / "optimizer.safetensors").write_bytes(payload)
    from glm_cli.core.checkpoint.directory import write_manifest

    write_manifest(last)
    with pytest.raises(CheckpointError, match="not a safetensors file|not a valid safetensors"):
        run(shards, tmp_path / "run", resume=True, max_steps=4)
    assert not marker.exists()


@pytest.fixture(scope="module")
def valid_safetensors(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    save_tensors(path, {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)})
    return path.read_bytes()


def _check(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        tensors = load_tensors(path)
    except CheckpointError:
        return
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=256))
def test_random_bytes_give_clean_errors(tmp_path, data):
    _check(tmp_path, data)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0, max_value=400), value=st.integers(0, 255),
       length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_mutated_headers_give_clean_errors(tmp_path, valid_safetensors, pos, value, length):
    data = bytearray(valid_safetensors)
    if length is not None:
        data[:8] = struct.pack("<Q", length)  # a hostile header length: never a huge allocation
    else:
        header_len = struct.unpack("<Q", data[:8])[0]
        data[8 + pos % header_len] = value
    _check(tmp_path, bytes(data))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=8), st.one_of(
    st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]),
                    st.one_of(st.text(max_size=4), st.lists(st.integers(-2, 2**40), max_size=3))),
    st.integers(), st.text(max_size=8)), max_size=3))
def test_structured_hostile_headers_give_clean_errors(tmp_path, header):
    raw = json.dumps(header).encode()
    _check(tmp_path, struct.pack("<Q", len(raw)) + raw + b"\0" * 64)


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """Temporary names are private (mkstemp/mkdtemp make them 0600/0700); what they become is not."""
    import os

    from glm_cli.core.io.atomic import atomic_dir, write_text_atomic

    mask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "inner").write_text("y")
    finally:
        os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
