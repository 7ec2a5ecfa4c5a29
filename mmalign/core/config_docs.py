"""Every key of an experiment's config with its value, default, valid values and doc, for
`mmalign train --show-config`. A field's doc is its `# comment` in the dataclass source: the trailing one, after
any comment lines right above the field."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal

from .config import Experiment, TrainConfig

_NO_DEFAULT = object()


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its comment text} for the fields a dataclass (and its dataclass bases) declare."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # built at runtime: no source to read
        return {}
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = not tok.line[:tok.start[1]].strip()
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    body = ast.parse(source).body[0].body
    docs = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        trailing = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1)
                    if n in comments and not comments[n][1]]
        text = " ".join(above + trailing)
        if text:
            docs[node.target.id] = text
    return docs


@dataclasses.dataclass
class KeyDoc:
    key: str  # dotted, as an override writes it
    value: Any
    default: Any  # _NO_DEFAULT: a required key
    valid: str  # range or choices; "" when any value of the type goes
    doc: str

    def line(self) -> str:
        default = "required" if self.default is _NO_DEFAULT else f"default: {_show(self.default)}"
        notes = "; ".join(n for n in (default, self.valid) if n)
        return f"{self.key} = {_show(self.value)}  ({notes})" + (f"  # {self.doc}" if self.doc else "")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) or value is None else str(value)


def _valid(tp: Any, f: dataclasses.Field) -> str:
    rng = f.metadata.get("range")
    if rng is not None:
        return f"must be {rng}"
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    literal = [t for t in options if typing.get_origin(t) is Literal]
    if literal:
        return "one of: " + ", ".join(str(v) for v in typing.get_args(literal[0]))
    return ""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _NO_DEFAULT


def config_keys(cls: type, value: Any = None, prefix: str = "") -> list[KeyDoc]:
    """A KeyDoc per leaf key of dataclass `cls` (nested sections flattened to dotted keys); `value`: an instance
    whose values to show (None: the defaults)."""
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        current = getattr(value, f.name) if value is not None else _default(f)
        if dataclasses.is_dataclass(tp):
            out += config_keys(tp, current if dataclasses.is_dataclass(current) else None, key + ".")
            continue
        out.append(KeyDoc(key, None if current is _NO_DEFAULT else current, _default(f), _valid(tp, f),
                          docs.get(f.name, "")))
    return out


def describe_experiment(exp: Experiment, method_config: type) -> str:
    """The text `mmalign train --show-config` prints: one line per key, resolved value first."""
    lines = [f"method = {exp.method!r}", f"output_dir = {exp.output_dir!r}"]
    lines += [k.line() for k in config_keys(TrainConfig, exp.train, "train.")]
    lines += [k.line() for k in config_keys(method_config, exp.args)]
    return "\n".join(lines)
