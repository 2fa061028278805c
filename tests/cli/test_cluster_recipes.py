"""The many-machine recipes of examples/cluster/: clean, the three dedup steps and encode over 2 shards must
equal one run of `glm clean`, `glm dedup` and `glm tokenize encode` over everything.

parallel.sh runs for real (GNU parallel if installed, else xargs -P), and so does the Ray recipe if Ray is
installed. Running real commands costs ~2 s a process on a loaded 2-core machine, so the other ways to run
the same recipe (xargs and parallel both, and Slurm through a fake `sbatch`) are checked with a fake `glm`
that records its arguments: they must issue exactly the commands of the real run's recipe.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, read_jsonl, train_tiny_tokenizer, write_jsonl
from conftest import glm_stdout as glm
from corpus_fixtures import prose, write_parquet

from glm_cli.core.io.corpus import read_documents
from glm_cli.core.io.shards import ShardSet

RECIPES = ROOT / "examples" / "cluster"
SHARDS = 2
GLM = f"{sys.executable} -m glm_cli"
ENCODE_ARGS = "--val-fraction 0.3"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Raw inputs of three kinds (8 shard units: a JSONL file, 6 parquet row groups, a text file), with an
    exact and a near duplicate and a document clean drops; and the outputs of one run over all of it."""
    root = tmp_path_factory.mktemp("recipes")
    raw = root / "raw"
    raw.mkdir()
    docs = [{"id": f"doc{i}", "text": prose(12, seed=i), "url": f"https://example.org/{i}"} for i in range(12)]
    docs.append({**docs[2], "id": "copy-of-2"})
    docs.append({**docs[5], "id": "near-5", "text": docs[5]["text"].replace(".", "!", 1)})
    docs.append({"id": "short", "text": "Too short to keep.", "url": "https://example.org/short"})
    write_jsonl(raw / "a.jsonl", docs[:4])
    write_parquet(raw / "b.parquet", docs[4:], row_group_size=2)
    (raw / "c.txt").write_text(prose(12, seed=99))

    base = root / "single"
    glm("clean", raw, "-o", base / "clean.jsonl", "-q")
    glm("dedup", base / "clean.jsonl", "-o", base / "dedup.jsonl", "-q")
    kept = read_jsonl(base / "dedup.jsonl")
    assert len(read_jsonl(base / "clean.jsonl")) == 15 and len(kept) == 13  # short dropped; copies found
    tok = root / "tok"
    train_tiny_tokenizer(tok, " ".join(d["text"] for d in kept), 300, repeat=2)
    glm("tokenize", "encode", base / "dedup.jsonl", "-t", tok, "-o", base / "shards", "-q", *ENCODE_ARGS.split())
    return {"raw": raw, "base": base, "tok": tok, "root": root}


def records(directory: Path) -> list[dict]:
    return [d.to_record() for d in read_documents([str(directory)])]


def check_equals_one_run(corpus, work: Path) -> None:
    base = corpus["base"]
    assert sorted(p.name for p in (work / "clean").iterdir()) == [f"{i:05d}.parquet" for i in range(SHARDS)]
    assert records(work / "clean") == read_jsonl(base / "clean.jsonl")
    assert records(work / "dedup") == read_jsonl(base / "dedup.jsonl")
    for split in ("train", "val"):
        one, sharded = ShardSet(base / "shards", split), ShardSet(work / "shards", split)
        assert sharded.total_documents == one.total_documents > 0
        assert b"".join(a.tobytes() for a in sharded.arrays) == b"".join(a.tobytes() for a in one.arrays)


def recipe_env(**extra) -> dict:
    return {**os.environ, "GLM": GLM, "JOBS": "2", "ENCODE_ARGS": ENCODE_ARGS, **extra}


def test_parallel_recipe_equals_one_run(corpus, tmp_path):
    work = tmp_path / "work"
    proc = subprocess.run(["bash", RECIPES / "parallel.sh", corpus["raw"], work, str(SHARDS), corpus["tok"]],
                          env=recipe_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    check_equals_one_run(corpus, work)
    again = subprocess.run(["bash", RECIPES / "parallel.sh", corpus["raw"], work, str(SHARDS)],
                           env=recipe_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr


# Stand-ins that record what they were asked to do. The fake glm logs its arguments; the fake sbatch logs
# how it was called, then runs the job at once (the tasks of an array side by side).
FAKE_GLM = """#!{python}
import json, os, sys
with open(os.environ["FAKE_GLM_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
"""
FAKE_SBATCH = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
path = os.environ["FAKE_SLURM_LOG"]
job = 100 + (len(open(path).readlines()) if os.path.exists(path) else 0)
with open(path, "a") as log:
    log.write(json.dumps({{"job": job, "args": args}}) + "\\n")
first, last = map(int, opts["array"].split("%")[0].split("-")) if "array" in opts else (None, None)
procs = []
for task in [None] if first is None else range(first, last + 1):
    env = {{**os.environ, "SLURM_JOB_ID": str(job)}}
    if task is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(task)
    procs.append(subprocess.Popen(["sh", "-c", opts["wrap"]], env=env))
if any(p.wait() for p in procs):
    sys.exit(1)
print(f"{{job}};cluster")
"""


def fake(path: Path, template: str) -> str:
    path.write_text(template.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def logged_commands(log: Path, work: Path) -> list[str]:
    return sorted(" ".join(json.loads(line)).replace(str(work), "WORK") for line in log.read_text().splitlines())


def test_runners_and_slurm_run_the_same_commands(corpus, tmp_path):
    """xargs, GNU parallel (if installed) and the Slurm jobs issue the same glm commands: one per shard and
    step, and one cluster; Slurm's jobs each wait for the one before (afterok)."""
    glm_fake = fake(tmp_path / "glm", FAKE_GLM)
    columns = "--id-column id"  # COLUMN_ARGS must reach every step that reads documents
    runs = {}
    for runner in ("xargs", "parallel") if shutil.which("parallel") else ("xargs",):
        work, log = tmp_path / f"work-{runner}", tmp_path / f"{runner}.log"
        proc = subprocess.run(["bash", RECIPES / "parallel.sh", corpus["raw"], work, str(SHARDS), corpus["tok"]],
                              env=recipe_env(GLM=glm_fake, FAKE_GLM_LOG=str(log), RUNNER=runner,
                                             COLUMN_ARGS=columns),
                              capture_output=True, text=True)
        assert proc.returncode == 0 and f"({runner})" in proc.stderr, proc.stderr
        runs[runner] = logged_commands(log, work)

    work, log, slurm_log = tmp_path / "work-slurm", tmp_path / "slurm-glm.log", tmp_path / "sbatch.log"
    assert subprocess.run(["bash", "-n", RECIPES / "slurm.sh"]).returncode == 0
    proc = subprocess.run(["bash", RECIPES / "slurm.sh", corpus["raw"], work, str(SHARDS), corpus["tok"]],
                          env=recipe_env(GLM=glm_fake, FAKE_GLM_LOG=str(log), ARRAY_LIMIT="8", COLUMN_ARGS=columns,
                                         SBATCH=fake(tmp_path / "sbatch", FAKE_SBATCH),
                                         FAKE_SLURM_LOG=str(slurm_log)),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    runs["slurm"] = logged_commands(log, work)

    commands = runs["xargs"]
    assert all(other == commands for other in runs.values()), runs
    steps = [" ".join(c.split()[:1 if c.startswith("clean") else 2]) for c in commands]
    assert [steps.count(s) for s in ("clean", "dedup signatures", "dedup cluster", "dedup filter",
                                     "tokenize encode")] == [SHARDS, SHARDS, 1, SHARDS, SHARDS]
    assert f"clean {corpus['raw']} --shard 00001/{SHARDS} -o WORK/clean/00001.parquet -q {columns}" in commands
    assert all(columns in c for c in commands if not c.startswith("dedup cluster"))

    jobs = [json.loads(line) for line in slurm_log.read_text().splitlines()]
    opts = [dict(a[2:].split("=", 1) for a in j["args"] if "=" in a) for j in jobs]
    assert [o["job-name"] for o in opts] == ["glm-clean", "glm-signatures", "glm-cluster", "glm-filter",
                                             "glm-encode"]
    array = f"0-{SHARDS - 1}%8"
    assert [o.get("array") for o in opts] == [array, array, None, array, array]
    assert "dependency" not in opts[0] and all("--parsable" in j["args"] for j in jobs)
    assert [o["dependency"] for o in opts[1:]] == [f"afterok:{j['job']}" for j in jobs[:-1]]


def test_ray_recipe_equals_one_run(corpus, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'glm-cli[ray]')")
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, RECIPES / "ray_recipe.py", corpus["raw"], work, str(SHARDS),
                           "--tokenizer", corpus["tok"], "--num-cpus", "2", "--glm", GLM,
                           "--encode-args", ENCODE_ARGS],
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_equals_one_run(corpus, work)
