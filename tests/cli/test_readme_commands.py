"""The README's "Start from a pretrained model" block runs as pasted on a fresh clone: every glm flag it
uses exists, and every file or directory a line reads is made by a line before it (or by `make data` on
its first line). Running it takes a real model and minutes (bench/real_model.py does that part); what a
newcomer trips on first is a file nobody told them to make, which this finds in milliseconds."""

import re
import shlex
from pathlib import Path

import typer

from glm_cli.app import app

ROOT = Path(__file__).resolve().parents[2]
READS = ("--data", "--task", "--calibration", "--prompts", "--val", "--reward-model")
WRITES = ("-o", "--output")


def readme_block(title: str) -> list[str]:
    """The first ```bash block under the README heading `title`, one command a line (continuations
    joined, comments and blank lines dropped)."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def glm_options() -> dict[str, set[str]]:
    """`glm` command path ("generate", "dedup run") -> every option name it takes."""
    def walk(command, prefix):
        if getattr(command, "commands", None):  # a group (typer may vendor its own click)
            for name, sub in command.commands.items():
                yield from walk(sub, (*prefix, name))
        else:
            yield " ".join(prefix), {o for p in command.params for o in (*p.opts, *p.secondary_opts)}

    return dict(walk(typer.main.get_command(app), ()))


def make_tasks_outputs() -> list[re.Pattern]:
    """The file names examples/make_tasks.py writes into its -o directory, as patterns."""
    source = (ROOT / "examples" / "make_tasks.py").read_text()
    names = re.findall(r'out / f?"([\w{}]+\.jsonl)"', source)
    assert names, "examples/make_tasks.py writes no out / \"NAME.jsonl\" files any more"
    return [re.compile(re.sub(r"\{\w+\}", r"\\w+", re.escape(n).replace(r"\{", "{").replace(r"\}", "}")) + "$")
            for n in names]


def test_start_from_a_pretrained_model_runs_on_a_fresh_clone():
    commands = readme_block("Start from a pretrained model")
    assert commands[0][:3] == ["make", "install", "data"] and "source" in commands[0]
    options = glm_options()
    made = {"data/raw", "$GGUF"}  # make data; the GGUF line sets $GGUF
    task_patterns = make_tasks_outputs()

    def available(path: str) -> bool:
        if path.startswith("tasks/") and "tasks" in made:
            return any(p.match(path.removeprefix("tasks/")) for p in task_patterns)
        return any(path == m or path.startswith(m.rstrip("/") + "/") for m in made)

    glm_lines = 0
    for words in commands:
        if words[0] == "glm":
            glm_lines += 1
            name = words[1] if words[1] in options else " ".join(words[1:3])
            assert name in options, f"README: glm {name} is not a command"
            rest = words[len(name.split()) + 1:]
            flags = {w.split("=", 1)[0] for w in rest if w.startswith("-")}
            assert flags <= options[name], f"README: glm {name} has no {sorted(flags - options[name])}"
            inputs = [rest[i + 1] for i, w in enumerate(rest[:-1]) if w in READS]
            positional = [w for i, w in enumerate(rest) if not w.startswith("-")
                          and (i == 0 or not rest[i - 1].startswith("-"))]
            if name in ("convert", "finetune", "quantize", "eval", "generate", "clean"):
                inputs += [p for p in positional if "/" in p or p.startswith("$")]
            if name in ("generate",):  # its positional is the model; the prompt is text
                inputs = [p for p in inputs if not p.startswith(("What", "Who"))]
            for path in inputs:
                assert available(path), f"README: `{shlex.join(words)}` reads {path}, which no line before makes"
            made |= {rest[i + 1] for i, w in enumerate(rest[:-1]) if w in WRITES}
        elif words[:2] == ["python", "examples/make_tasks.py"]:
            assert (ROOT / words[1]).is_file()
            assert available(words[2]), f"README: make_tasks reads {words[2]}, which no line before makes"
            made.add(words[words.index("-o") + 1])
    assert glm_lines >= 8
