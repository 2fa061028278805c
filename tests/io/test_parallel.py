"""`map_ordered` with workers: input order kept, the calling process computing beside the pool."""

import os

import pytest
from pool_probe import fail_on_seven, pid_after_sleep

from glm_cli.core.io.parallel import map_ordered


def test_the_caller_computes_while_it_would_wait_and_order_is_kept():
    results = list(map_ordered(pid_after_sleep, range(60), workers=2, chunk_size=1))
    assert [x for _, x in results] == list(range(60))
    pids = {pid for pid, _ in results}
    assert os.getpid() in pids  # the pool takes ~0.2 s to start: the caller works meanwhile
    assert len(pids) == 2  # one pool worker (workers - 1) did the rest, and no other process


def test_an_error_arrives_in_its_turn_from_either_process():
    got = []
    with pytest.raises(KeyError):
        for x in map_ordered(fail_on_seven, range(20), workers=2, chunk_size=1):
            got.append(x)
    assert got == list(range(7))
