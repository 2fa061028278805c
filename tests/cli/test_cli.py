"""The CLI surface: every command is registered, documented with an example, and fails politely."""

import subprocess
import sys

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
def test_a_command_built_alone_parses_as_in_the_whole_app(name):
    """`glm NAME ...` builds NAME alone (glm_cli.app.main): it must take the same parameters, with the same
    flags, defaults and help, as in the app with every command."""
    import typer.main

    from glm_cli.app import build_app

    def params(command):
        if hasattr(command, "commands"):
            return {sub: params(c) for sub, c in sorted(command.commands.items())}
        return [(p.name, tuple(p.opts), tuple(p.secondary_opts), repr(p.default), p.help) for p in command.params]

    alone = typer.main.get_command(build_app(only=name))
    assert sorted(alone.commands) == [name]
    assert params(alone.commands[name]) == params(typer.main.get_command(app).commands[name])


def test_the_command_line_names_the_one_command_to_build():
    code = ("import sys; sys.argv = ['glm', 'convert', '--help']\n"
            "from glm_cli.app import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('glm_cli.commands.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['_common', 'convert']"  # no other command's module
    from glm_cli.app import _named_command

    assert _named_command(["dedup", "run", "x"]) == "dedup"
    assert _named_command(["--version"]) is None and _named_command([]) is None
    assert _named_command(["dedupe"]) is None  # a misspelt name: the whole app, whose error suggests "dedup"


def test_a_quiet_command_does_not_import_rich(tmp_path):
    """rich is imported on the first line a command prints (~30 ms of start-up): `glm dedup run -q` on a
    tiny file prints nothing and never imports it, and without -q the same run logs its line through it."""
    import subprocess
    import sys

    corpus = tmp_path / "in.jsonl"
    corpus.write_text('{"id": "a", "text": "one short document"}\n')
    code = ("import sys\n"
            "sys.argv = ['glm', 'dedup', 'run', sys.argv[1], '-o', sys.argv[2], *sys.argv[3:]]\n"
            "from glm_cli.app import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('rich' in sys.modules)")
    for extra, imported in (["-q"], "False"), ([], "True"):
        proc = subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / "out.jsonl"), *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [imported]
        assert ("dedup: 1 documents in" in proc.stderr) == (not extra)


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
    """Every command's (and subcommand's) option names and arguments, as a user types them; a hidden
    option (kept only to tell old scripts its new name) is marked so."""
    import typer.main

    def names(p) -> list[str]:
        if p.param_type_name != "option":
            return [f"<{p.name}>"]
        return [f"{opt} (hidden)" if p.hidden else opt for opt in p.opts + p.secondary_opts]

    root = typer.main.get_command(app)
    flags = {}
    for name in NAMES:
        for words, params in _commands(name):
            flags[words] = sorted(opt for p in params for opt in names(p))
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


def test_training_commands_agree():
    """pretrain, finetune and align take their shared settings under the same names, with the help of
    the TrainConfig field they set (written once), and --dtype reads the same in every command."""
    import typer.main

    from glm_cli.core.field_docs import train_doc
    from glm_cli.core.precision import dtype_help

    options = {name: {p.opts[0]: p for p in typer.main.get_command(app).commands[name].params
                      if p.param_type_name == "option"} for name in ("pretrain", "finetune", "align")}
    for name, opts in options.items():
        for flag in ("--config", "--set", "--dtype", "--device", "--seed", "--lr", "--max-steps",
                     "--micro-batch-size", "--grad-accum", "--eval-every"):
            assert flag in opts, f"glm {name} lacks {flag}"
        for flag, field in (("--lr", "lr"), ("--max-steps", "max_steps"), ("--grad-accum", "grad_accum"),
                            ("--eval-every", "eval_every"), ("--device", "device"), ("--seed", "seed")):
            assert opts[flag].help.startswith(train_doc(field)), (name, flag)
        assert opts["--dtype"].help.startswith(dtype_help("bf16 autocast on CUDA, fp32 on CPU")), name
    assert "--peft" in options["finetune"] and "--peft" in options["align"]
    assert options["finetune"]["--method"].hidden
    for name in ("generate", "eval", "convert"):
        dtype = next(p for p in typer.main.get_command(app).commands[name].params if "--dtype" in p.opts)
        assert dtype.help.startswith("Precision: auto ("), name


def test_tuning_flags_take_help_and_default_from_the_settings_classes():
    """Every finetune/align flag that sets a PeftConfig, DPOConfig or PPOConfig field shows that field's
    docstring and default (declared once, in core/tune/settings.py), and --method lists ALIGN_METHODS."""
    import typer.main

    from glm_cli.core.field_docs import field_docs
    from glm_cli.core.tune.align_setup import ALIGN_METHODS, AlignOptions
    from glm_cli.core.tune.settings import DPOConfig, PeftConfig, PPOConfig

    peft = {"--lora-rank": "rank", "--lora-alpha": "alpha", "--lora-dropout": "dropout", "--lora-targets": "targets",
            "--adapter-dim": "adapter_dim", "--prompt-tokens": "prompt_tokens"}
    dpo = {"--beta": "beta", "--label-smoothing": "label_smoothing", "--loss-type": "loss_type"}
    ppo = {f"--{f.replace('_', '-')}": f for f in ("kl_coef", "rollout_size", "ppo_epochs", "clip", "vf_coef",
                                                    "max_new_tokens", "temperature")}
    commands = typer.main.get_command(app).commands
    for name in ("finetune", "align"):
        opts = {p.opts[0]: p for p in commands[name].params if p.param_type_name == "option"}
        tables = [(PeftConfig, peft)] + ([(DPOConfig, dpo), (PPOConfig, ppo)] if name == "align" else [])
        for cls, flags in tables:
            docs, defaults = field_docs("glm_cli.core.tune.settings", cls.__name__), cls()
            for flag, field in flags.items():
                doc, default = docs[field], getattr(defaults, field)
                assert doc[1:] in opts[flag].help, (name, flag)
                assert opts[flag].default == (",".join(default) if isinstance(default, list) else default), flag
                if name == "align":  # the options object a script fills starts from the same defaults
                    key = {"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
                           "targets": "lora_targets"}.get(field, field)
                    assert getattr(AlignOptions(data="d", output="o"), key) == opts[flag].default, flag
    method = next(p for p in commands["align"].params if "--method" in p.opts)
    assert method.help == "Alignment method: " + ", ".join(list(ALIGN_METHODS)[:-1]) + f" or {list(ALIGN_METHODS)[-1]}."


@pytest.mark.parametrize("command, module, cls, fields", [
    ("generate", "glm_cli.core.infer.generation", "GenerationConfig",
     ["max_new_tokens", "stop", "num_beams", "length_penalty"]),
    ("serve", "glm_cli.core.serve.server", "ServeConfig", ["slots", "context", "max_queue"]),
    ("quantize", "glm_cli.core.quant.weight_only", "QuantScheme",
     ["bits", "method", "group_size", "head_bits", "keep_embeddings"]),
    ("clean", "glm_cli.core.clean.quality", "GopherQuality", ["min_words", "max_words"]),
    ("clean", "glm_cli.core.clean.quality", "GopherRepetition", ["max_dup_line_fraction"]),
    ("clean", "glm_cli.core.clean.normalize", "NormalizeConfig", ["unicode_form"]),
    ("clean", "glm_cli.core.clean.language_id", "LanguageFilter", [("lang_threshold", "min_score")]),
])
def test_flags_that_set_a_field_show_its_docstring_and_default(command, module, cls, fields):
    """One declaration: the flag's help is the field's docstring (its `field` names shown as flags) and
    its default the field's."""
    import dataclasses
    import importlib
    import re

    import typer.main

    from glm_cli.core.field_docs import field_docs

    # the declared defaults (an unset field a __post_init__ resolves, e.g. keep_embeddings by bits, is unset here)
    declared = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(getattr(importlib.import_module(module), cls))
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    opts = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    for param, field in (f if isinstance(f, tuple) else (f, f) for f in fields):
        doc = re.sub(r"`(\w+)`", lambda m: "--" + m.group(1).replace("_", "-"), field_docs(module, cls)[field])
        assert doc[1:] in opts[param].help, (command, field)  # [1:]: a prefix lowercases its first letter
        default = declared[field]
        assert opts[param].default == (default or None if isinstance(default, list) else default), (command, field)


def test_settings_for_help_import_no_torch():
    """The modules --help reads defaults from stay torch-free: every glm invocation imports them."""
    code = ("import sys; import glm_cli.core.tune.settings, glm_cli.core.tune.defaults, glm_cli.commands._tuning; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_finetune_method_is_now_peft(tmp_path):
    proc = run_glm("finetune", tmp_path, "--data", tmp_path / "d.jsonl", "-o", tmp_path / "r", "--method", "lora")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "--peft lora" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["generate", "convert"])
def test_dtype_refuses_unknown_names_in_one_line(name, tmp_path):
    args = {"generate": [tmp_path, "hi"], "convert": [tmp_path / "m.gguf", "-o", tmp_path / "out"]}[name]
    proc = run_glm(name, *args, "--dtype", "fp8")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "--dtype 'fp8'" in err and "bf16" in err and "Traceback" not in err
