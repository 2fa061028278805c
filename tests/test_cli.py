"""The CLI surface: every command is registered, documented with an example, and fails politely."""

import pytest
from conftest import run_glm

from glm_cli import __version__
from glm_cli.app import COMMANDS, app

NAMES = [name for name, _, _ in COMMANDS]


def test_version():
    proc = run_glm("--version", check=True)
    assert proc.stdout.decode().strip() == f"glm {__version__}"


def test_every_command_is_registered():
    registered = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert set(NAMES) <= registered, f"missing commands: {set(NAMES) - registered}"


@pytest.mark.parametrize("name", NAMES)
def test_help_has_an_example_and_defaults(name):
    proc = run_glm(name, "--help", env={"COLUMNS": "200", "TERM": "dumb"})
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode()
    assert "Example" in text or "example" in text, f"`glm {name} --help` shows no example"


def test_unknown_option_is_a_usage_error():
    proc = run_glm("clean", "--no-such-option", "x")
    assert proc.returncode == 2


def test_missing_input_is_one_line_not_a_traceback(tmp_path):
    proc = run_glm("clean", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out.jsonl"))
    assert proc.returncode in (1, 2)
    err = proc.stderr.decode()
    assert "Traceback" not in err
    assert "nope.jsonl" in err
