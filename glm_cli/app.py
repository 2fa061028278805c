"""The `glm` command: a typer app whose subcommands live in `glm_cli.commands`, one module each.

This is the CLI boundary: errors raised by core code (`glm_cli.core.errors`) become one line on stderr
and an exit status (2 for bad usage, 1 for failures); a closed stdout pipe (`glm ... | head`) ends the
command quietly, as coreutils do.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import typer

from glm_cli import __version__

# (name, module, one-line help). A module exposes either `command` (a function) or `app` (a typer group).
COMMANDS = [
    ("clean", "clean", "Normalize, filter and redact raw text into clean documents."),
    ("dedup", "dedup", "Remove exact and near-duplicate documents, repeated lines and eval contamination."),
    ("tokenize", "tokenize", "Train a BPE tokenizer, encode corpora to token shards, decode, stats."),
    ("pretrain", "pretrain", "Pretrain a Transformer on token shards (CPU, GPU, torchrun)."),
    ("finetune", "finetune", "Supervised fine-tuning: full, LoRA, adapters or prompt tuning."),
    ("align", "align", "Preference alignment: DPO, reward models, PPO."),
    ("quantize", "quantize", "Quantize a checkpoint to int8/int4 (safetensors or GGUF)."),
    ("generate", "generate", "Generate text from a checkpoint."),
    ("eval", "evaluate", "Evaluate checkpoints: perplexity, multiple choice, generation tasks."),
    ("convert", "convert", "Convert a Hugging Face directory or a GGUF file to a glm checkpoint."),
    ("serve", "serve", "Serve a checkpoint over the OpenAI HTTP API, with continuous batching."),
]

def _version(value: bool) -> None:
    if value:
        typer.echo(f"glm {__version__}")
        raise typer.Exit()


def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """glm: raw text to a trained, aligned, quantized and evaluated language model."""


def build_app(only: str | None = None) -> typer.Typer:
    """The `glm` app with every command, or with the command `only` alone. A command is cheap to list but
    not to build: typer makes a validator for each of its parameters and the command's module imports
    what its options need, so building all eleven costs ~0.15 s of a ~0.5 s start. `main` builds only
    the command a command line names; the same registration serves both, so that command parses the
    same either way."""
    app = typer.Typer(
        name="glm",
        help="glm: raw text to a trained, aligned, quantized and evaluated language model, one command at a time.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    for name, module_name, help_text in COMMANDS:
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(f"glm_cli.commands.{module_name}")
        except ModuleNotFoundError as e:
            if e.name == f"glm_cli.commands.{module_name}":
                continue  # not built yet
            raise
        # help_text is the one-liner in `glm --help`; each command's own docstring (with its example)
        # stays the text of `glm COMMAND --help`.
        if hasattr(module, "app"):
            app.add_typer(module.app, name=name, short_help=help_text)
        else:
            app.command(name, short_help=help_text, no_args_is_help=getattr(module, "NO_ARGS_IS_HELP", True))(
                module.command)
    return app


def __getattr__(name: str):
    """`glm_cli.app.app`, the app with every command (tests, `typer.testing`), built when first asked for."""
    if name == "app":
        globals()["app"] = full = build_app()
        return full
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _named_command(argv: list[str]) -> str | None:
    """The command a command line names in first place (`glm dedup run ...` -> "dedup"), else None
    (`glm`, `glm --help`, `glm --version`, a misspelt name: those get every command)."""
    return argv[0] if argv and argv[0] in {name for name, _, _ in COMMANDS} else None


def main() -> None:
    from glm_cli.core.allocator import freeze_heap_at_fork, retain_freed_memory
    from glm_cli.core.errors import GlmError

    retain_freed_memory()
    freeze_heap_at_fork()  # the process is this command's: its objects at a pool's fork live to its end

    if hasattr(signal, "SIGPIPE"):
        # A reader that goes away (`glm clean ... | head`) ends us quietly, as it ends coreutils (status 141),
        # instead of a BrokenPipeError traceback or click's exit 1.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        build_app(only=_named_command(sys.argv[1:]))()
    except GlmError as e:
        from rich.markup import escape

        from glm_cli.core.console import console

        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except BrokenPipeError:
        # The reader went away (`glm clean ... | head`): stop quietly, like coreutils under SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
