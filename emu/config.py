"""Typed configuration: one dataclass per stage, YAML presets as their on-disk form, `key=value` overrides.

DESIGN.md convention 2: each stage has its own config dataclass next to the code it configures, every
field documented, values checked in `__post_init__` with messages naming the setting. A preset
(`configs/<name>.yaml`) holds one mapping per stage section (`synth:`, `import:`, `validate:`,
`stage1:` ...). Resolution order, later wins: dataclass defaults < preset section < overrides.
Unknown keys are rejected with the list of valid ones; every run saves its resolved config.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from emu.errors import ConfigError

T = TypeVar("T")

#: Presets shipped with the repository, found relative to the package (editable install / image).
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


def preset_path(preset: str | Path) -> Path:
    """Return the YAML file of a preset given by name (`tiny`) or by path (`my/preset.yaml`)."""
    candidate = Path(preset)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"preset file {candidate} does not exist")
        return candidate
    named = PRESET_DIR / f"{preset}.yaml"
    if not named.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
        raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(known) or 'none'} "
                          f"(in {PRESET_DIR}); or pass a path ending in .yaml")
    return named


def load_preset(preset: str | Path) -> dict[str, Any]:
    """Read a preset file: a mapping from section name to that section's settings."""
    path = preset_path(preset)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def resolve(cls: type[T], section: str, preset: str | Path | None = None,
            overrides: Sequence[str] = ()) -> T:
    """Build `cls` from its dataclass defaults, the preset's `section`, then `key=value` overrides."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if preset is not None:
        whole = load_preset(preset)
        _check_sections(whole, section, preset)
        section_data = whole.get(section) or {}
        if not isinstance(section_data, dict):
            raise ConfigError(f"section {section!r} of preset {preset} must be a mapping")
        data = _deep_copy(section_data)
        origin = f"preset {preset}"
    for override in overrides:
        _apply_override(cls, data, override, section)
    return from_dict(cls, data, where=section, origin=origin)


def _check_sections(whole: Mapping[str, Any], section: str, preset: str | Path) -> None:
    """A misspelt section ("validat:") would be ignored and its settings silently lost: refuse
    any section that is neither a known one (emu.sections) nor the one being resolved."""
    from emu.sections import SECTIONS  # imports nothing heavy; the config classes load lazily

    unknown = [str(name) for name in whole if name not in SECTIONS and name != section]
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} in preset {preset}; "
                          f"valid sections: {', '.join(SECTIONS)}")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "", origin: str = "config") -> T:
    """Build a (possibly nested) config dataclass from a mapping, checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown setting {_join(where, unknown[0])!r} in {origin}; "
                          f"valid settings{' of ' + where if where else ''}: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, Mapping):
            # A partial nested mapping refines this field's own default (e.g. the decoder's
            # optimizer defaults to betas (0.9, 0.999)), not the nested class's generic one.
            value = {**to_dict(_field_default(fields[name])), **value}
        kwargs[name] = _coerce(value, hints[name], _join(where, name), origin)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a config dataclass (enums as values), as written to YAML."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(config)


def save_resolved(config: Any, section: str, path: Path) -> Path:
    """Write `{section: resolved settings}` so the file can be passed back as a preset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({section: to_dict(config)}, sort_keys=False), encoding="utf-8")
    return path


def valid_keys(cls: type) -> list[str]:
    """Every dotted key an override may set on `cls` (nested dataclasses flattened)."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += [f"{f.name}.{k}" for k in valid_keys(tp)]
        else:
            keys.append(f.name)
    return keys


def _apply_override(cls: type, data: dict[str, Any], override: str, section: str) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must have the form key=value")
    path = key.split(".")
    target_cls: Any = cls
    node = data
    for depth, part in enumerate(path):
        if not (dataclasses.is_dataclass(target_cls)):
            # Inside a dict-typed field ("batch_sizes.pairs=8"): keys are free, values typed later.
            if not _is_mapping_type(target_cls):
                raise ConfigError(f"override {override!r}: {'.'.join(path[:depth])!r} is not a group")
            if depth != len(path) - 1:
                raise ConfigError(f"override {override!r}: nesting too deep")
            node[part] = _checked(raw, typing.get_args(target_cls)[1], section, key, override)
            return
        fields = {f.name: f for f in dataclasses.fields(target_cls) if f.init}
        if part not in fields:
            prefix = ".".join(path[:depth])
            raise ConfigError(
                f"unknown setting {_join(section, key)!r} (override {override!r}); valid settings"
                f"{' of ' + _join(section, prefix) if prefix else ' of ' + section}: "
                f"{', '.join(sorted(fields))}")
        field_type = typing.get_type_hints(target_cls)[part]
        if depth == len(path) - 1:
            node[part] = _checked(raw, field_type, section, key, override)
            return
        child = node.get(part)
        if not isinstance(child, dict):
            # "batch_sizes.grounded=0" changes one entry of the default mapping, not all of it.
            child = dict(_field_default(fields[part]) or {}) if _is_mapping_type(field_type) else {}
            node[part] = child
        node = child
        target_cls = field_type


def _checked(raw: str, field_type: Any, section: str, key: str, override: str) -> Any:
    """The parsed value of one override, type-checked now so that an error names the override
    (not the preset or the defaults it lands in). The raw parsed value is kept: from_dict
    coerces the whole section once more, together with the preset's values."""
    value = _parse_scalar(raw, field_type)
    if not dataclasses.is_dataclass(field_type):
        _coerce(value, field_type, _join(section, key), f"override {override!r}")
    return value


def _parse_scalar(raw: str, field_type: Any) -> Any:
    """Parse an override's text: verbatim for str fields (so `key=007` stays a string), else YAML."""
    if field_type is str or field_type == (str | None) and raw.strip().lower() not in ("null", "none", "~"):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _coerce(value: Any, tp: Any, where: str, origin: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"setting {where!r} in {origin}: expected {expected}, got {value!r}")

    origin_tp = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, where=where, origin=origin)
    if origin_tp in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad(_type_name(tp))
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, where, origin)
            except ConfigError:
                pass
        raise bad(_type_name(tp))
    if origin_tp is typing.Literal:
        if value not in args:
            raise bad("one of " + ", ".join(repr(a) for a in args))
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise bad("one of " + ", ".join(repr(m.value) for m in tp)) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value)  # "1e4": PyYAML reads exponents without a dot as strings
            except ValueError:
                raise bad("an integer") from None
            if as_float.is_integer():
                return int(as_float)
        raise bad("an integer")
    if tp is float:
        # Every float setting is a rate, ratio, threshold or size: NaN and infinity are never
        # meant, and NaN would slip through range checks (`nan <= 0` is False).
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # PyYAML reads "1e-4" (no dot) as a string
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise bad("a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if origin_tp in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]", origin) for i, v in enumerate(value)]
        return tuple(items) if origin_tp is tuple else items
    if _is_mapping_type(tp):
        if not isinstance(value, Mapping):
            raise bad("a mapping")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, where, origin): _coerce(v, val_tp, f"{where}.{k}", origin)
                for k, v in value.items()}
    raise ConfigError(f"setting {where!r}: unsupported type {tp!r} (a bug in the config class)")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _is_mapping_type(tp: Any) -> bool:
    return typing.get_origin(tp) in (dict, Mapping) or tp is dict


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
