"""core/io/runner.py: the writers see every batch, and a failed run leaves no errors file and stops its source."""

from __future__ import annotations

import pytest

from glm_cli.core.io.corpus import BadRecord, ErrorPolicy
from glm_cli.core.io.runner import run_stages


class ListWriter:
    def __init__(self):
        self.items, self.closed = [], False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True


def test_every_batch_reaches_the_writers_in_order():
    out, log = ListWriter(), ListWriter()
    run_stages(iter([[1, 2], [3]]), lambda batch, a, b: a.items.extend(batch) or b.items.append(len(batch)) or
               len(batch), writers=[out, log])
    assert out.items == [1, 2, 3] and log.items == [2, 1] and out.closed and log.closed


def test_a_failure_closes_everything_and_writes_no_errors_file(tmp_path):
    errors = tmp_path / "errors.jsonl"
    policy = ErrorPolicy("skip", str(errors))
    policy.handle(BadRecord(source="in.jsonl", line=3, reason="not JSON", raw="{"))
    stopped = []

    def source():
        try:
            yield [1]
            yield [2]
        finally:
            stopped.append(True)

    def write(batch, out):
        if batch == [2]:
            raise OSError("disk full")
        out.items.extend(batch)
        return 1

    out = ListWriter()
    with pytest.raises(OSError, match="disk full"):
        run_stages(source(), write, writers=[out], policy=policy)
    assert out.closed and stopped == [True] and not errors.exists()


def test_a_finished_run_writes_the_errors_file(tmp_path):
    errors = tmp_path / "errors.jsonl"
    policy = ErrorPolicy("skip", str(errors))
    policy.handle(BadRecord(source="in.jsonl", line=3, reason="not JSON", raw="{"))
    run_stages(iter([[1]]), lambda batch: 1, policy=policy)
    assert errors.exists() and "in.jsonl" in errors.read_text()
