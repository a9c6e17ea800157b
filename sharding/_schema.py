"""Machinery of the ``dataset.json`` schema in :mod:`sharding.format`: typed reads whose errors
name the file and the dotted field, and ``to_dict`` in the writer's key order.

Written by hand rather than with pydantic: sharding depends on numpy, nibabel, pydicom and PIL
only, and the checks are a handful of types and lengths.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, NoReturn

from sharding.records import SourceError

REBUILD = "rebuild the shards with bigmodel-shard build"


class ManifestFormatError(SourceError):
    """A ``dataset.json`` that does not fit the schema; one line naming the file, field and fix."""

    def __init__(self, file: str, field_name: str, problem: str, fix: str = REBUILD) -> None:
        self.field = field_name
        super().__init__(file, problem, fix)

    def __reduce__(self):
        return (type(self), (self.file, self.field, self.problem, self.fix))


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # JSON true/false is not a number
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


_KIND_NAMES = {
    int: "int",
    float: "a number",
    str: "str",
    bool: "bool",
    list: "a list",
    dict: "an object",
}
_JSON_NAMES = {
    int: "int",
    float: "float",
    str: "str",
    bool: "bool",
    list: "list",
    dict: "object",
    type(None): "null",
}


class _Fields:
    """Typed reads from one JSON object of the manifest; errors name the dotted field."""

    def __init__(self, data: Any, where: str, path: str) -> None:
        if not isinstance(data, dict):
            got = _JSON_NAMES.get(type(data), type(data).__name__)
            raise ManifestFormatError(
                path, where, f"field {where or 'top level'} should be an object, got {got}"
            )
        self.data, self.where, self.path = data, where, path

    def only(self, record: type) -> _Fields:
        """Refuse a key that is not a field of the dataclass ``record`` (a typo, or a field of
        another format); return self."""
        known = [f.name for f in fields(record)]
        for key in self.data:
            if key not in known:
                self.fail(
                    key,
                    f"field {self.name(key)} is not part of the schema (known here: "
                    f"{', '.join(known)})",
                    "correct or remove it; the schema is sharding/format.py",
                )
        return self

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str, fix: str = REBUILD) -> NoReturn:
        raise ManifestFormatError(self.path, self.name(key), problem, fix)

    def get(self, key: str, kind: type, required: bool = False) -> Any:
        """The value of ``key`` (None when absent or null and not required)."""
        value = self.data.get(key)
        if value is None:
            if required:
                self.fail(key, f"field {self.name(key)} is missing")
            return None
        if not _is(value, kind):
            got = _JSON_NAMES.get(type(value), type(value).__name__)
            self.fail(key, f"field {self.name(key)} should be {_KIND_NAMES[kind]}, got {got}")
        return value

    def list_of(self, key: str, kind: type, required: bool = False) -> list | None:
        values = self.get(key, list, required)
        if values is not None:
            for i, value in enumerate(values):
                if not _is(value, kind):
                    got = _JSON_NAMES.get(type(value), type(value).__name__)
                    self.fail(
                        key, f"field {self.name(key)}[{i}] should be {_KIND_NAMES[kind]}, got {got}"
                    )
            values = list(values)
        return values

    def choice(self, key: str, allowed: tuple[str, ...], required: bool = False) -> str | None:
        value = self.get(key, str, required)
        if value is not None and value not in allowed:
            self.fail(key, f"field {self.name(key)} is {value!r}; allowed: {', '.join(allowed)}")
        return value

    def obj(self, key: str, required: bool = False) -> _Fields | None:
        value = self.get(key, dict, required)
        return None if value is None else _Fields(value, self.name(key), self.path)

    def objects(self, key: str, required: bool = False) -> list[_Fields] | None:
        values = self.get(key, list, required)
        if values is None:
            return None
        return [_Fields(v, f"{self.name(key)}[{i}]", self.path) for i, v in enumerate(values)]


def _maybe(parse, fields_: _Fields | None, *args):
    """``parse(fields_, *args)``, or None for an absent (or null) object."""
    return None if fields_ is None else parse(fields_, *args)


def _plain(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Record:
    """``to_dict`` for the schema's dataclasses: fields in declaration order (the writer's key
    order), ``None`` left out unless the field's metadata says ``write_null``."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and not f.metadata.get("write_null"):
                continue
            out[f.name] = _plain(value)
        return out
