"""Load a TOML file into msgspec Structs and report *every* problem with its path.

msgspec stops at the first validation error, which makes an operator fix a config one line per
restart. We decode each top-level section, and each element of array-of-tables sections, on its
own, so one run lists all problems found at that depth, each as ``FILE: $.path: message``.
Semantic checks (cross-field rules) append to the same list.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from gpufleet import facts

# Field types shared by the daemons' configs.
Port = Annotated[int, Meta(ge=1, le=65535)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
Fraction = Annotated[float, Meta(gt=0, le=1)]
Percent = Annotated[float, Meta(ge=0, le=100)]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


class StrictSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A config section: unknown keys are errors (a typo must not be silently ignored)."""


EX_CONFIG = facts.EX_CONFIG  # re-exported: the daemons and CLIs import it from here

_AT_RE = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.S)


@dataclass(frozen=True)
class ConfigProblem:
    path: str  # JSONPath-like, "$.instances[1].port"
    message: str

    def format(self, file: str | Path) -> str:
        return f"{file}: {self.path}: {self.message}"


@dataclass
class ConfigError(Exception):
    file: str
    problems: list[ConfigProblem] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(p.format(self.file) for p in self.problems)


def problem_from_validation(
    err: msgspec.ValidationError, prefix: str, typ: Any = None, value: Any = None
) -> ConfigProblem:
    """Turn msgspec's "Expected `int`, got `str` - at `$.port`" into a path + message.

    Given the type that was decoded and the value it was decoded from, a message an operator
    cannot act on is made human: a Literal or enum names its allowed values, a URL field says
    how to write the URL."""
    m = _AT_RE.match(str(err))
    assert m is not None
    sub = m.group("path") or "$"
    message = m.group("msg").strip()
    if typ is not None:
        steps = _steps(sub)
        if steps is not None:
            message = _explain(message, _type_at(msgspec.inspect.type_info(typ), steps), _value_at(value, steps))
    return ConfigProblem(prefix + sub[1:], message)


_STEP_RE = re.compile(r"\.(\w+)|\[(\d+|\.\.\.)\]")
_MISSING = object()


def _steps(path: str) -> list[str | int | None] | None:
    """``$.routes[0].task`` -> ["routes", 0, "task"]; a dict key msgspec does not name
    (``[...]``) is None. None for a path this does not understand."""
    steps: list[str | int | None] = []
    pos = 1
    while pos < len(path):
        m = _STEP_RE.match(path, pos)
        if m is None:
            return None
        name, index = m.groups()
        steps.append(name if name is not None else (None if index == "..." else int(index)))
        pos = m.end()
    return steps


def _type_at(t: Any, steps: list[str | int | None]) -> Any:
    for step in steps:
        while isinstance(t, msgspec.inspect.UnionType):  # Optional[X]: the non-None member
            members = [u for u in t.types if not isinstance(u, msgspec.inspect.NoneType)]
            if len(members) != 1:
                return None
            t = members[0]
        if isinstance(step, str) and isinstance(t, msgspec.inspect.StructType):
            t = next((f.type for f in t.fields if f.encode_name == step), None)
        elif isinstance(step, int) and isinstance(t, msgspec.inspect.ListType | msgspec.inspect.SetType):
            t = t.item_type
        elif isinstance(t, msgspec.inspect.DictType):
            t = t.value_type
        else:
            return None
    return t


def _value_at(value: Any, steps: list[str | int | None]) -> Any:
    for step in steps:
        if isinstance(step, str) and isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(step, int) and isinstance(value, list) and step < len(value):
            value = value[step]
        else:
            return _MISSING
    return value


def _explain(message: str, t: Any, value: Any) -> str:
    while isinstance(t, msgspec.inspect.UnionType):
        members = [u for u in t.types if not isinstance(u, msgspec.inspect.NoneType)]
        t = members[0] if len(members) == 1 else None
    choices: tuple[Any, ...] = ()
    if isinstance(t, msgspec.inspect.LiteralType):
        choices = t.values
    elif isinstance(t, msgspec.inspect.EnumType):
        choices = tuple(e.value for e in t.cls)
    if choices and message.startswith("Invalid enum value"):
        return f"{value!r} is not one of " + ", ".join(repr(c) for c in choices)
    pattern = getattr(t, "pattern", None)
    if pattern and pattern.startswith("^https?://") and isinstance(value, str):
        return url_problem(value) or message
    return message


BASE_URL_RE = re.compile(r"^https?://[^/\s]+(:\d+)?/?$")  # what etcd endpoints and advertise URLs are


def url_problem(value: str) -> str | None:
    """What is wrong with ``value`` as an http(s)://host[:port] URL, said so it can be fixed."""
    if BASE_URL_RE.match(value):
        return None
    if "://" not in value:
        return f"{value} is not a URL; write http://{value}"
    scheme = value.partition("://")[0]
    if scheme not in ("http", "https"):
        return f"{value}: the scheme must be http:// or https://, not {scheme}://"
    return f"{value} is not a base URL; write {scheme}://HOST[:PORT] with nothing after the port"


def is_loopback(host: str) -> bool:
    """A listen host or URL host only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        name = host.lower().rstrip(".")
        return name == "localhost" or name.endswith(".localhost")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read and parse; raises ConfigError with a line-level message on bad TOML."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(p), [ConfigProblem("$", f"cannot read file: {e.strerror or e}")]) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), [ConfigProblem("$", f"not UTF-8: {e}")]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), [ConfigProblem("$", f"invalid TOML: {e}")]) from None


def convert_sections(
    data: dict[str, Any],
    sections: dict[str, type],
    lists: dict[str, type],
    problems: list[ConfigProblem],
) -> dict[str, Any]:
    """Convert each section separately, collecting problems instead of stopping at the first.

    ``sections`` maps table names to Struct types; ``lists`` maps array-of-tables names to the
    Struct type of one element. Unknown top-level keys are reported. Returns the converted values
    for the sections that converted cleanly (missing sections get the type's defaults).
    """
    out: dict[str, Any] = {}
    for key in data:
        if key not in sections and key not in lists:
            problems.append(ConfigProblem(f"$.{key}", "unknown section"))
    for key, typ in sections.items():
        try:
            out[key] = msgspec.convert(data.get(key, {}), typ, strict=True)
        except msgspec.ValidationError as e:
            problems.append(problem_from_validation(e, f"$.{key}", typ, data.get(key, {})))
    for key, typ in lists.items():
        items = data.get(key, [])
        if not isinstance(items, list):
            problems.append(ConfigProblem(f"$.{key}", "expected an array of tables ([[" + key + "]])"))
            continue
        converted = []
        for i, item in enumerate(items):
            try:
                converted.append(msgspec.convert(item, typ, strict=True))
            except msgspec.ValidationError as e:
                problems.append(problem_from_validation(e, f"$.{key}[{i}]", typ, item))
                converted.append(None)
        out[key] = converted
    return out


EMPTY_FILE = (
    "empty config file (no settings at all): a truncated or half-written file? "
    "Refusing it rather than running with no instances"
)


def load_document(path: str | Path) -> dict[str, Any]:
    """Read and parse a config file that must say something.

    Every setting has a default, so an empty file (or only blank lines and comments: what a
    failed write, a truncation or an editor crash leaves) would be a valid config that runs
    nothing, and a reload with it would stop everything. It is refused instead: a config must
    contain at least one key or table.
    """
    data = read_toml(path)
    if not data:
        raise ConfigError(str(path), [ConfigProblem("$", EMPTY_FILE)])
    return data


def load_sections(
    path: Path, sections: dict[str, type], lists: dict[str, type], data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read ``path`` (unless its parsed ``data`` is given) and convert its sections; raises
    ConfigError listing every problem."""
    problems: list[ConfigProblem] = []
    parts = convert_sections(load_document(path) if data is None else data, sections, lists, problems)
    if problems:
        raise ConfigError(str(path), problems)
    return parts
