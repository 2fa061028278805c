"""`map_ordered` and `WorkerPool` with workers: input order kept, each chunk computed exactly once by
whichever process claims it first (the calling process included), errors and early stops handled; and
the commands with --workers start their pools with one thread, so that the workers are forked."""

import multiprocessing
import os
import sys
from functools import partial

import pytest
from pool_probe import busy_then_big, fail_at, fail_on_seven, logged, pid_after_sleep

from glm_cli.core.io.parallel import CLAIM_SLOTS, WorkerPool, _claim, map_ordered


def test_the_caller_computes_while_it_would_wait_and_order_is_kept():
    results = list(map_ordered(pid_after_sleep, range(60), workers=2, chunk_size=1))
    assert [x for _, x in results] == list(range(60))
    pids = {pid for pid, _ in results}
    assert os.getpid() in pids  # the pool takes ~0.2 s to start: the caller works meanwhile
    assert len(pids) == 2  # one pool worker (workers - 1) did the rest, and no other process


@pytest.mark.parametrize("workers", [2, 3])
def test_every_item_is_computed_once_whoever_claims_it(tmp_path, workers):
    # every chunk is queued to the pool and may also be taken by the caller: a claim that let both
    # compute it would still give the right results, so count who computed what
    out = list(map_ordered(partial(logged, str(tmp_path)), range(300), workers=workers, chunk_size=3))
    assert out == list(range(300))
    logs = {p.name: [int(x) for x in p.read_text().split()] for p in tmp_path.glob("*.log")}
    done = sorted(x for xs in logs.values() for x in xs)
    assert done == list(range(300))  # each item once: no chunk lost, none computed twice
    assert f"{os.getpid()}.log" in logs and len(logs) >= 2  # the caller and the pool both worked


def test_results_are_the_same_for_any_worker_count():
    expected = [(x * 7919) % 1009 for x in range(500)]
    for workers in (1, 2, 4):
        got = list(map_ordered(partial(pow, exp=1, mod=1009), [x * 7919 for x in range(500)], workers, chunk_size=7))
        assert got == expected


def test_a_claim_is_taken_once_and_a_stale_chunk_is_refused():
    claims = multiprocessing.get_context("spawn").Array("q", CLAIM_SLOTS)
    assert _claim(claims, 5)
    assert not _claim(claims, 5)  # the other process gets False
    assert _claim(claims, 5 + CLAIM_SLOTS)  # the slot reused by a later chunk
    assert not _claim(claims, 5)  # the old chunk, arriving late, is not computed again


def test_an_error_arrives_in_its_turn_from_either_process():
    got = []
    with pytest.raises(KeyError):
        for x in map_ordered(fail_on_seven, range(20), workers=2, chunk_size=1):
            got.append(x)
    assert got == list(range(7))


def test_an_error_computed_in_a_worker_reaches_the_caller(tmp_path):
    # 300 items in chunks of 1 with the failing one late: by then the pool is up and takes its share,
    # and whichever process computed item 250 the same error arrives after exactly 250 results
    got = []
    with pytest.raises(KeyError):
        for x in map_ordered(partial(fail_at, 250), range(300), workers=2, chunk_size=1):
            got.append(x)
    assert got == list(range(250))


def test_a_consumer_that_stops_early_shuts_the_pool_down():
    with WorkerPool(2) as pool:
        results = pool.map(pid_after_sleep, range(1000), chunk_size=1)
        assert [x for _, x in (next(results) for _ in range(5))] == list(range(5))
        results.close()  # the consumer stops: the pool's queued chunks must not run on
        assert pool._pool is None
        with pytest.raises(RuntimeError, match="closed"):
            list(pool.map(abs, [1]))


def test_the_pool_forks_only_a_process_with_one_thread():
    """A fresh process (as `glm` is when its command creates the pool) forks; one with a second thread,
    which could hold a lock at the fork, spawns. Run apart: this test process has threads of its own."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import threading
        from glm_cli.core.io.parallel import start_method
        print(start_method())
        threading.Thread(target=threading.Event().wait, args=(10,), daemon=True).start()
        print(start_method())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == (["fork", "spawn"] if sys.platform.startswith("linux") else ["spawn", "spawn"])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_forked_and_spawned_pools_give_the_same_results(monkeypatch, method):
    from glm_cli.core.io import parallel

    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} here")
    monkeypatch.setattr(parallel, "start_method", lambda: method)
    with WorkerPool(2) as pool:
        assert pool._pool._ctx.get_start_method() == method
        first = list(pool.map(pid_after_sleep, range(40), chunk_size=1))
        second = list(pool.map(partial(pow, exp=1, mod=1009), range(0, 5000, 7), chunk_size=5))
    assert [x for _, x in first] == list(range(40)) and len({pid for pid, _ in first}) == 2
    assert second == [x % 1009 for x in range(0, 5000, 7)]


def test_the_pool_does_not_spin_while_results_wait_to_be_read(monkeypatch):
    """CPython's pool wakes its worker-handler thread whenever the result pipe holds unread data; with
    the calling process computing chunks of its own (the GIL held), results wait, and the thread looped,
    taking the GIL each time (2,800 wake-ups in a 100 MB `glm dedup run`). Ours sleeps until a worker
    exits or the pool changes state."""
    import multiprocessing.pool

    wakeups = []
    wait = multiprocessing.pool.Pool._wait_for_updates

    def counted(sentinels, change_notifier, timeout=None):
        wakeups.append(1)
        return wait(sentinels, change_notifier, timeout)

    monkeypatch.setattr(multiprocessing.pool.Pool, "_wait_for_updates", staticmethod(counted))
    with WorkerPool(2) as pool:
        out = list(pool.map(busy_then_big, range(60), chunk_size=1))
    assert [b[0] for b in out] == list(range(60)) and all(len(b) == 512 << 10 for b in out)
    assert len(wakeups) < 10, f"the worker handler woke {len(wakeups)} times for 60 results"


def test_glm_dedup_run_forks_its_pool_after_importing_numpy(tmp_path):
    """`glm dedup run` keeps numpy's BLAS to one thread (`single_threaded_blas`) and imports everything
    before it starts its pool, so the process still has one thread there and the workers are forked,
    ready at once, instead of spawned. Run apart (this test process has threads and numpy already), with
    the pool's constructor reporting what it found. A value the user set is kept."""
    import json

    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(k), "text": f"document number {k} " * 20}) + "\n"
                              for k in range(50)))
    args = ("dedup", "run", str(corpus), "-o", str(tmp_path / "out.jsonl"), "--workers", "2", "-q")
    report = 'parallel.start_method(), "numpy" in sys.modules, os.environ.get("OPENBLAS_NUM_THREADS")'
    assert _glm_reporting_pools(*args, report=report) == ["POOL", FORK, "True", "1"]
    assert _glm_reporting_pools(*args, report=report, env={"OPENBLAS_NUM_THREADS": "2"})[-1] == "2"
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 50


def _glm_reporting_pools(*args: str, report: str = "parallel.start_method(), workers",
                         env: dict[str, str] | None = None) -> list[str]:
    """Run `glm ARGS` in a fresh process (this one has threads and numpy already) with every WorkerPool
    printing "POOL" and the values of `report` as it starts; returns the printed words. numpy's BLAS
    thread count is left to the command, as on a user's machine, unless `env` sets it."""
    import subprocess
    import textwrap

    code = textwrap.dedent(f"""
        import os, sys
        from glm_cli.core.io import parallel
        init = parallel.WorkerPool.__init__
        def reporting(self, workers, preload=()):
            print("POOL", {report})
            init(self, workers, preload)
        parallel.WorkerPool.__init__ = reporting
        sys.argv = ["glm", *sys.argv[1:]]
        from glm_cli.app import main
        main()
    """)
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          env={**base, **(env or {})}).stdout.split()


FORK = "fork" if sys.platform.startswith("linux") else "spawn"


def _prose_corpus(path, n: int = 40):
    import json

    from corpus_fixtures import prose

    path.write_text("".join(json.dumps({"id": str(k), "text": prose(12, seed=k)}) + "\n" for k in range(n)))
    return path


def test_glm_dedup_signatures_forks_its_pool_too(tmp_path):
    """`glm dedup signatures` (the many-machine recipe's step 1) keeps numpy's BLAS to one thread as `glm
    dedup run` does, so the pool `--workers 2` starts is forked as well; and the three steps still give
    `run`'s output."""
    import json

    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(k), "text": f"document number {k % 40} " * 20}) + "\n"
                              for k in range(60)))
    sigs, plan, out = tmp_path / "sigs.npz", tmp_path / "plan.json", tmp_path / "out.jsonl"
    assert _glm_reporting_pools("dedup", "signatures", str(corpus), "-o", str(sigs), "--workers", "2", "-q") \
        == ["POOL", FORK, "2"]
    _glm_reporting_pools("dedup", "cluster", str(sigs), "-o", str(plan), "-q")
    assert _glm_reporting_pools("dedup", "filter", str(corpus), "--plan", str(plan), "-o", str(out), "-q") == []
    _glm_reporting_pools("dedup", "run", str(corpus), "-o", str(tmp_path / "run.jsonl"), "-q")
    assert out.read_bytes() == (tmp_path / "run.jsonl").read_bytes() and len(out.read_text().splitlines()) == 40


def test_glm_clean_forks_its_pool(tmp_path):
    """`glm clean --workers 2` keeps numpy's BLAS to one thread too (cleaning multiplies no matrices), so
    its pool is forked rather than spawned, with the output of one worker."""
    corpus = _prose_corpus(tmp_path / "in.jsonl")
    outs = [tmp_path / "one.jsonl", tmp_path / "two.jsonl"]
    for out, workers in zip(outs, ("1", "2"), strict=True):
        assert _glm_reporting_pools("clean", str(corpus), "-o", str(out), "--workers", workers, "-q") \
            == ["POOL", FORK, workers]
    assert outs[0].read_bytes() == outs[1].read_bytes() and len(outs[0].read_text().splitlines()) == 40


def test_glm_tokenize_encode_forks_its_pool(tmp_path):
    """`glm tokenize encode --workers 2` starts its pool before checking tiktoken against `tokenizers`
    (which starts the latter's threads) and keeps numpy's BLAS to one thread, so the pool is forked; the
    shards are those of one worker."""
    corpus = _prose_corpus(tmp_path / "in.jsonl")
    _glm_reporting_pools("tokenize", "train", str(corpus), "-o", str(tmp_path / "tok"), "--vocab-size", "400", "-q")
    for workers in ("1", "2"):
        assert _glm_reporting_pools("tokenize", "encode", str(corpus), "-t", str(tmp_path / "tok"), "-o",
                                    str(tmp_path / f"shards{workers}"), "--workers", workers, "-q") \
            == ["POOL", FORK, workers]
    one, two = sorted((tmp_path / "shards1").iterdir()), sorted((tmp_path / "shards2").iterdir())
    assert [f.name for f in one] == [f.name for f in two] and len(one) >= 2
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two, strict=True))


def test_a_command_freezes_its_heap_before_forking_a_pool(tmp_path):
    """The command-line process freezes the garbage collector's objects right before it forks a pool (their
    pages then stay shared with the workers); a library caller's objects are left collectable."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import gc, sys
        from glm_cli.core import allocator
        from glm_cli.core.io.parallel import WorkerPool
        if sys.argv[1] == "command":
            allocator.freeze_heap_at_fork()
        before = gc.get_freeze_count()
        with WorkerPool(2) as pool:
            print(before, gc.get_freeze_count() > before, sum(pool.map(abs, range(-50, 0), chunk_size=5)))
    """)
    for who, frozen in (("command", "True"), ("library", "False")):
        out = subprocess.run([sys.executable, "-c", code, who], capture_output=True, text=True, check=True).stdout
        assert out.split() == ["0", frozen if FORK == "fork" else "False", "1275"]
    corpus = _prose_corpus(tmp_path / "in.jsonl")
    assert _glm_reporting_pools("dedup", "run", str(corpus), "-o", str(tmp_path / "out.jsonl"), "--workers", "2", "-q",
                                report="__import__('glm_cli.core.allocator').core.allocator._freeze_at_fork") \
        == ["POOL", "True"]
