"""The docstring under each field of a settings dataclass, so a flag's help is the field's documentation.

A flag such as `--lr` mirrors `TrainConfig.lr`; writing its help a second time in a command would let
the two drift apart. It sits directly in core/, below every package, because every settings class
(TrainConfig, DedupConfig, SamplingConfig, ...) feeds flags this way. The class source is parsed with
`ast`, not imported: every `glm` invocation builds the help of every command, and the modules holding the
settings may pull in torch.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
from pathlib import Path


@functools.cache
def field_docs(module: str, class_name: str) -> dict[str, str]:
    """{field: its docstring on one line} for the fields of `module.class_name` that have one."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LookupError(f"no module {module}")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            docs = {}
            for stmt, after in zip(node.body, node.body[1:], strict=False):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                        and isinstance(after.value.value, str)):
                    docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
            return docs
    raise LookupError(f"{module} has no class {class_name}")


def train_doc(name: str, extra: str = "") -> str:
    """The help of a flag that sets `TrainConfig.<name>`, with `extra` (what the command adds) after it."""
    return _with(field_docs("glm_cli.core.train.settings", "TrainConfig")[name], extra)


def data_doc(name: str, extra: str = "") -> str:
    """The help of a flag that sets `PretrainData.<name>`."""
    return _with(field_docs("glm_cli.core.train.settings", "PretrainData")[name], extra)


def _with(doc: str, extra: str) -> str:
    return f"{doc} {extra}" if extra else doc
