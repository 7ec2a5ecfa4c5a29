"""Dataclass configs loaded from YAML plus `a.b=value` overrides, with strict validation."""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the file and the dotted key."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2-style scalars: only true/false are bools (`no` stays a string), `1e-5` is a float.
    A mapping that sets a key twice is an error (PyYAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:  # before merge keys (`<<`) are flattened in: a merged key may be overridden
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, mark = (key_node.tag, key_node.value), key_node.start_mark
            if key in seen:
                raise ConfigError(f"{mark.name}: line {mark.line + 1}: duplicate key '{key_node.value}' (first set on "
                                  f"line {seen[key]}); a mapping may set each key once")
            seen[key] = mark.line + 1
        return super().construct_mapping(node, deep=deep)


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in (_BOOL, _FLOAT)]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field (see `bounded`); a float must also be finite."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def admits(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return "a finite number"


# Metadata of a config field that does not change the training trajectory (a cache folder, a precompute batch
# size): it stays out of a run's identity, so changing it does not make a resumption "another run".
NOT_IDENTITY = {"run_identity": False}


def bounded(default, lo=None, hi=None, lo_open=False, hi_open=False, identity: bool = True):
    """A dataclass field whose value (each item, for a tuple) must lie in the range; checked when a config
    loads (`from_dict`) and by `check_ranges`. No bounds: any finite number. identity=False: see NOT_IDENTITY."""
    meta = {"range": Range(lo, hi, lo_open, hi_open), **({} if identity else NOT_IDENTITY)}
    return field(default=default, metadata=meta)


def not_identity(default):
    """A dataclass field kept out of the run identity (see NOT_IDENTITY)."""
    return field(default=default, metadata=NOT_IDENTITY)


def _check_range(f: dataclasses.Field, value, key: str) -> None:
    rng = f.metadata.get("range")
    if rng is None or value is None:
        return
    items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
    for i, v in items:
        if not rng.admits(v):
            bound = str(rng)
            if isinstance(v, float) and not math.isfinite(v) and bound != "a finite number":
                bound = f"a finite number {bound}"
            raise _Bad(key if i is None else f"{key}[{i}]", f"must be {bound}, got {v!r}")


def check_ranges(obj, prefix: str = "") -> None:
    """Range-check a config dataclass built in Python (the loader checks what it builds); a ConfigError names
    the dotted key."""
    def walk(o, pre):
        for f in dataclasses.fields(o):
            key, value = f"{pre}.{f.name}" if pre else f.name, getattr(o, f.name)
            _check_range(f, value, key)
            if dataclasses.is_dataclass(value):
                walk(value, key)
    try:
        walk(obj, prefix)
    except _Bad as e:
        raise ConfigError(f"{e.args[0]}: {e.args[1]}") from None


@dataclass
class TrainConfig:
    lr: float = bounded(1e-4, 0, lo_open=True)
    max_steps: int = bounded(100, 1)
    max_minutes: float = bounded(0.0, 0)  # > 0: stop (checkpoint saved, resumable) after this much training time
    batch_size: int = bounded(8, 1)  # per device, per micro-batch
    grad_accum: int = bounded(1, 1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    max_grad_norm: Optional[float] = bounded(1.0, 0)  # 0 or None disables clipping
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    weight_decay: float = bounded(0.0, 0)
    adam_betas: tuple[float, float] = bounded((0.9, 0.999), 0, 1, hi_open=True)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = bounded(0, 0)
    seed: int = bounded(0, 0, 2**32 - 1)  # numpy's seed range
    log_every: int = bounded(10, 1)
    save_every: int = bounded(0, 0)  # 0: only at the end
    keep_last: int = bounded(3, 0)  # checkpoints kept; 0 keeps all
    tensorboard: bool = False
    resume: str = "auto"  # "auto" (this run's own) | "never" | "force" (whatever is there) | a checkpoint dir
    num_workers: int = bounded(0, 0)


@dataclass
class Experiment:
    method: str
    output_dir: str
    train: TrainConfig = field(default_factory=TrainConfig)
    args: Any = None  # the method's config dataclass (remaining top-level sections)


class _Bad(Exception):
    """(dotted key, message); turned into a ConfigError naming the file by from_dict."""


def _convert(tp, value, key: str):
    """Check `value` against type `tp`; return it converted (nested dataclasses built, lists -> tuples)."""
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    got = f"got {type(value).__name__} {value!r}"
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Bad(key, f"expected a section ({tp.__name__}), got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        options = [t for t in targs if t is not type(None)]
        if value is None and len(options) < len(targs):
            return None
        if len(options) == 1:
            return _convert(options[0], value, key)
        for option in options:
            try:
                return _convert(option, value, key)
            except _Bad:
                pass
        raise _Bad(key, f"expected {str(tp).replace('typing.', '')}, {got}")
    if origin is Literal:
        if value not in targs or isinstance(value, bool) != isinstance(targs[0], bool):
            raise _Bad(key, f"expected one of {list(targs)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Bad(key, f"expected a list, {got}")
        if origin is tuple and targs and targs[-1] is not Ellipsis:
            if len(value) != len(targs):
                raise _Bad(key, f"expected {len(targs)} items, got {len(value)}")
            return tuple(_convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(targs, value)))
        items = [_convert(targs[0] if targs else Any, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise _Bad(key, f"expected a mapping, {got}")
        return {k: _convert(targs[1] if targs else Any, v, f"{key}.{k}") for k, v in value.items()}
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}.get(tp, isinstance(value, tp) if isinstance(tp, type) else True)
    if not ok:
        raise _Bad(key, f"expected {getattr(tp, '__name__', tp)}, {got}")
    return float(value) if tp is float else value


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise _Bad(key, f"unknown key (known: {', '.join(fields)})")
        kwargs[k] = _convert(hints[k], v, key)
        _check_range(fields[k], kwargs[k], key)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Bad(f"{prefix}.{name}" if prefix else name, "missing required key")
    return cls(**kwargs)


def from_dict(cls, data: dict, where: str, prefix: str = "", overrides: dict[str, str] | None = None):
    """Build dataclass `cls` from `data`; any problem is a ConfigError naming `where` and the dotted key.
    `overrides` ({dotted key: override text}) lets the message say a bad key came from an override."""
    try:
        if not isinstance(data, dict):
            raise _Bad(prefix or "top level", f"expected a mapping, got {type(data).__name__}")
        return _build(cls, data, prefix)
    except _Bad as e:
        key, msg = e.args
        src = next((f" (from override '{o}')" for k, o in (overrides or {}).items()
                    if key == k or key.startswith((k + ".", k + "["))), "")
        raise ConfigError(f"{where}: {key}: {msg}{src}") from None


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Set `a.b.c=value` entries in `raw` (in place); return {dotted key: override text}."""
    applied = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"malformed override '{item}' (expected key.path=value)")
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': {'.'.join(parts[:i + 1])} is not a section")
        try:
            node[parts[-1]] = yaml.load(text, Loader=_Loader)
        except (yaml.YAMLError, ConfigError) as e:
            raise ConfigError(f"override '{item}': invalid YAML value: {e}") from None
        applied[key.strip()] = item
    return applied


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def read_method_name(path: str, overrides=()) -> str:
    raw = load_yaml(path)
    apply_overrides(raw, overrides)
    name = raw.get("method")
    if not isinstance(name, str):
        raise ConfigError(f"{path}: method: missing required key (a method name string)")
    return name


def load_experiment(path: str, overrides=(), method_config: type | Callable[[str], type] | None = None) -> Experiment:
    """Load `path` + overrides. `method_config` is the method's config dataclass, or a lookup name -> dataclass;
    None keeps the method sections as a plain dict."""
    raw = load_yaml(path)
    applied = apply_overrides(raw, overrides)
    top = {k: raw.pop(k) for k in ("method", "output_dir", "train") if k in raw}
    exp = from_dict(Experiment, top, path, overrides=applied)
    cls = method_config
    if cls is not None and not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        cls = cls(exp.method)
    exp.args = raw if cls is None else from_dict(cls, raw, path, overrides=applied)
    return exp


def _plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def resolved_dict(exp: Experiment) -> dict:
    return {"method": exp.method, "output_dir": exp.output_dir, "train": _plain(exp.train), **_plain(exp.args or {})}


def save_resolved(exp: Experiment, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(resolved_dict(exp), f, sort_keys=False)
