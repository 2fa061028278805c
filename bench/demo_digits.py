"""Does the demo print the digits the README promises? Reads a demo directory and compares.

The demo is meant to give the same numbers on any machine of the same instruction set, however fast
(fixed step counts, no wall-clock cap, seeded everything). This script turns that claim into a check:
it reads the summaries the stages write under $DEMO and compares each number with
examples/demo_expected.json, at the precision the expected value is written with.

    python bench/demo_digits.py runs/demo               # after `make demo`: every stage
    python bench/demo_digits.py --run data              # runs stages 10-30 (about 30 s) in a temp dir
    python bench/demo_digits.py --run all               # the whole demo (about 15 min on 2 cores)

Exit status 1 when a digit differs, or a stage's summary is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = ROOT / "examples" / "demo_expected.json"
DATA_STAGES = ["10_clean", "20_dedup", "30_tokenize"]
CHAT_TASKS = {"play": "chat_mc_play_val", "speaker": "chat_mc_speaker_val", "next_line": "chat_mc_next_line_val"}
CHECKPOINTS = {"pretrained": "pretrain/final", "finetuned": "finetune/final", "aligned": "align/final"}


def _load(demo: Path, name: str) -> dict | None:
    path = demo / name
    return json.loads(path.read_text()) if path.exists() else None


def data_digits(demo: Path) -> dict[str, float]:
    """The numbers stages 10-30 print, by the keys of demo_expected.json's "data"."""
    got: dict[str, float] = {}
    if clean := _load(demo, "clean-summary.json"):
        got.update({"clean.docs_in": clean["docs_in"], "clean.docs_out": clean["docs_out"],
                    "clean.bytes_in": clean["bytes_in"], "clean.bytes_out": clean["bytes_out"],
                    "clean.navigation_lines_removed": clean["changes"].get("navigation_lines.removed", 0)})
    if dedup := _load(demo, "dedup-summary.json"):
        got.update({f"dedup.{k}": dedup[k] for k in
                    ("near_duplicates", "boilerplate_keys", "lines_removed", "kept", "bytes_out")})
    if stats := _load(demo, "tokenize-stats.json"):
        for split in ("train", "val"):
            got[f"tokenize.{split}_documents"] = stats["splits"][split]["documents"]
            got[f"tokenize.{split}_tokens"] = stats["splits"][split]["tokens"]
    return got


def model_digits(demo: Path) -> dict[str, float]:
    """The numbers stages 40-90 print, by the keys of demo_expected.json's "model"."""
    got: dict[str, float] = {}
    if pretrain := _load(demo, "pretrain-summary.json"):
        got["pretrain.val_bpb"] = pretrain["metrics"]["val_bpb"]
    if finetune := _load(demo, "finetune.json"):
        got["finetune.val_loss"] = finetune["val_loss"]
    if align := _load(demo, "align.json"):
        got["align.val_reward_accuracy"] = align["val_reward_accuracy"]
        got["align.val_reward_margin"] = align["val_reward_margin"]
    for kind in ("int8", "int4", "gguf"):
        if report := _load(demo, f"quantize-{kind}.json"):
            got[f"quantize.{kind}_ppl_change_pct"] = report["perplexity_change_pct"]
    if chat := _load(demo, "eval-chat-report.json"):
        for stage, ckpt in CHECKPOINTS.items():
            results = next((r for path, r in chat["results"].items() if path.endswith(ckpt)), None)
            for short, task in CHAT_TASKS.items():
                if results and task in results:
                    got[f"eval.{short}.{stage}"] = results[task]["metrics"]["acc"]
    return got


def same_at_written_precision(expected: str, value: float) -> bool:
    decimals = len(expected.partition(".")[2])
    return f"{value:.{decimals}f}" == f"{float(expected):.{decimals}f}"


def compare(expected: dict[str, str], got: dict[str, float]) -> list[str]:
    """One line per mismatch or missing number; prints the comparison table on stderr."""
    problems = []
    for key, want in expected.items():
        if key not in got:
            problems.append(f"{key}: missing (its stage did not run or wrote no summary)")
            continue
        ok = same_at_written_precision(want, got[key])
        print(f"{'ok ' if ok else 'DIFF'} {key:34s} expected {want:>10s}   got {got[key]}", file=sys.stderr)
        if not ok:
            problems.append(f"{key}: expected {want}, got {got[key]}")
    return problems


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def run_stages(demo: Path, stages: list[str]) -> None:
    env = {**os.environ, "DEMO": str(demo)}
    for stage in stages:
        print(f"=== {stage}", file=sys.stderr)
        subprocess.run(["bash", str(ROOT / "examples" / "stages" / f"{stage}.sh")], cwd=ROOT, env=env,
                       check=True, stdout=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", nargs="?", type=Path, help="a demo directory (default: run the stages)")
    parser.add_argument("--run", choices=["data", "all"], help="run these stages first, in a temp directory")
    args = parser.parse_args()
    if (args.demo is None) == (args.run is None):
        parser.error("give a demo directory or --run, not both")
    expected = json.loads(EXPECTED.read_text())
    with tempfile.TemporaryDirectory(prefix="glm-demo-") as tmp:
        demo = args.demo or Path(tmp)
        if args.run:
            stages = DATA_STAGES if args.run == "data" else sorted(
                p.stem for p in (ROOT / "examples" / "stages").glob("*.sh"))
            run_stages(demo, stages)
        wanted = dict(expected["data"])
        if args.run != "data":
            isa = cpu_capability()
            if isa not in expected["model"]:
                print(f"no expected model digits for CPU capability {isa}: checking the data stages only",
                      file=sys.stderr)
            wanted.update(expected["model"].get(isa, {}))
        problems = compare(wanted, {**data_digits(demo), **model_digits(demo)})
    for line in problems:
        print(f"demo_digits: {line}", file=sys.stderr)
    print(f"demo_digits: {len(wanted) - len(problems)} of {len(wanted)} numbers as expected", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
