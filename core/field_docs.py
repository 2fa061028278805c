"""The docstring under each field of a settings dataclass, so a flag's help is the field's documentation.

A flag such as `--lr` mirrors `TrainConfig.lr`; writing its help a second time in a command would let
the two drift apart. It sits directly in core/, below every package, because every settings class
(TrainConfig, DedupConfig, SamplingConfig, PeftConfig, PPOConfig, ...) feeds flags this way. The class source is parsed with
`ast`, not imported: every `glm` invocation builds the help of every command, and the modules holding the
settings may pull in torch.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import re
from collections.abc import Callable
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


@functools.cache
def table_keys(module: str, name: str) -> tuple[str, ...]:
    """The string keys of the dict literal `module.name` (a table such as ALIGN_METHODS), in order, read
    from the source like the field docs, so a flag's help can list the choices without importing torch."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LookupError(f"no module {module}")
    for node in ast.parse(Path(spec.origin).read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == name and isinstance(node.value, ast.Dict):
            return tuple(ast.literal_eval(key) for key in node.value.keys)
    raise LookupError(f"{module} has no dict literal {name}")


def one_of(names) -> str:
    """'a, b or c': choices as a message offers them."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def field_doc(module: str, class_name: str, name: str, extra: str = "", prefix: str = "",
              flags: Callable[[str], str] | None = None) -> str:
    """The help of a flag that sets `module.class_name.<name>`: `prefix`, the field's docstring, then
    `extra` (what the command adds, such as which other flag it goes with). `flags` names the flag of a
    field: the `field` names the docstring mentions in backquotes are shown as their flags."""
    doc = field_docs(module, class_name)[name]
    if prefix and doc[1:2].islower():  # "ppo: weight of ...", but "ppo: KL ..."
        doc = doc[0].lower() + doc[1:]
    if flags is not None:
        doc = re.sub(r"`(\w+)`", lambda m: flags(m.group(1)), doc)
    return " ".join(part for part in (prefix, doc, extra) if part)


def as_flag(field: str) -> str:
    """The flag of a field by the naming every command keeps: `seq_len` -> `--seq-len`."""
    return "--" + field.replace("_", "-")


def train_doc(name: str, extra: str = "") -> str:
    """The help of a flag that sets `TrainConfig.<name>`, with `extra` (what the command adds) after it."""
    return field_doc("glm_cli.core.train.settings", "TrainConfig", name, extra)


def data_doc(name: str, extra: str = "") -> str:
    """The help of a flag that sets `PretrainData.<name>`."""
    return field_doc("glm_cli.core.train.settings", "PretrainData", name, extra)
