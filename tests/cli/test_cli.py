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
    for words, params in _commands(name):
        valued = [p for p in params if p.param_type_name == "option" and not p.is_flag
                  and p.default is not None and not p.hidden]
        hidden = [p.name for p in valued if p.show_default is False]
        assert not hidden, f"`glm {words} --help` hides the default of {hidden}"
        if valued:
            from typer.testing import CliRunner

            shown = CliRunner().invoke(app, [*words.split(), "--help"], env={"COLUMNS": "200"}).stdout
            assert "[default:" in shown, f"`glm {words} --help` shows no default"


def _commands(name):
    """(words, click parameters) of `glm NAME`, or of each subcommand when NAME is a group."""
    import typer.main

    command = typer.main.get_command(app).commands[name]
    subcommands = getattr(command, "commands", {})
    if not subcommands:
        return [(name, command.params)]
    return [(f"{name} {sub}", c.params) for sub, c in subcommands.items()]


def test_unknown_option_is_a_usage_error():
    proc = run_glm("clean", "--no-such-option", "x")
    assert proc.returncode == 2


def test_missing_input_is_one_line_not_a_traceback(tmp_path):
    proc = run_glm("clean", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out.jsonl"))
    assert proc.returncode in (1, 2)
    err = proc.stderr.decode()
    assert "Traceback" not in err
    assert "nope.jsonl" in err


FLAGS = __import__("pathlib").Path(__file__).parents[1] / "golden" / "cli_flags.json"


def _flag_set() -> dict[str, list[str]]:
    """Every command's (and subcommand's) option names and arguments, as a user types them."""
    import typer.main

    root = typer.main.get_command(app)
    flags = {}
    for name in NAMES:
        for words, params in _commands(name):
            flags[words] = sorted(opt for p in params for opt in (p.opts + p.secondary_opts
                                                                  if p.param_type_name == "option"
                                                                  else [f"<{p.name}>"]))
    assert root.commands  # the app built
    return flags


def test_the_flag_set_changes_only_on_purpose():
    """A snapshot of the interface: adding, renaming or removing a flag is a deliberate diff of
    tests/golden/cli_flags.json (regenerate with GLM_UPDATE_GOLDEN=1 and review it)."""
    import json
    import os

    current = _flag_set()
    if os.environ.get("GLM_UPDATE_GOLDEN"):
        FLAGS.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {FLAGS}")
    assert current == json.loads(FLAGS.read_text())
