"""One thin module per subcommand: parse and validate options, call `glm_cli.core`, report.

Modules here import only typer and the standard library at import time; torch and friends are imported
inside the command function so that `glm --help` and `glm clean` start fast.
"""
