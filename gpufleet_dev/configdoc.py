"""Generate ``docs/config.md``, the reference of every config key, from the config Structs.

One source of truth: the msgspec Structs give each key's type, default and constraints (``Meta``
ge/le/pattern, ``Literal`` choices), and the comments written beside each field in the source give
its meaning. The comments are read with ``tokenize`` rather than moved into
``Meta(description=...)``: they already explain *why* for the maintainer reading the Struct, and
one text serves both readers. A field's description is the block of ``#`` lines directly above it
plus a trailing ``#`` on its own line; a Struct's docstring describes its section.

    python -m gpufleet_dev.configdoc > docs/config.md

``tests/test_configdoc.py`` fails when the checked-in file differs from what this prints.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import json
import re
import sys
import tokenize
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from msgspec import inspect as mi

import agent.config as agent_config
import coordinator.config as coordinator_config
from gpufleet import policyconfig

REGENERATE = "python -m gpufleet_dev.configdoc > docs/config.md"
# Where a key's comment says it is deprecated (kept so that old files load, with a warning).
_DEPRECATED_RE = re.compile(r"^\s*deprecated\b", re.I)

# --- comments from the source ---------------------------------------------------------------------


@dataclass(frozen=True)
class FieldDoc:
    text: str
    deprecated: bool


@functools.cache
def _source_comments(path: str) -> tuple[dict[int, str], dict[int, str], dict[str, dict[str, tuple[int, int]]]]:
    """(full-line comments by line, trailing comments by line, class -> field -> (first, last line))."""
    source = Path(path).read_text()
    full: dict[int, str] = {}
    trailing: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string[1:].strip()
            (trailing if tok.start[0] in code_lines else full)[tok.start[0]] = text
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    fields: dict[str, dict[str, tuple[int, int]]] = {}
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.ClassDef):
            fields[node.name] = {
                stmt.target.id: (stmt.lineno, stmt.end_lineno or stmt.lineno)
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    return full, trailing, fields


def field_doc(cls: type, name: str) -> FieldDoc:
    """The comments written beside field ``name`` where it is defined (``cls`` or a base)."""
    for owner in cls.__mro__:
        try:
            path = inspect.getsourcefile(owner)
        except TypeError:
            continue
        if path is None:
            continue
        full, trailing, fields = _source_comments(path)
        span = fields.get(owner.__name__, {}).get(name)
        if span is None:
            continue
        first, last = span
        above: list[str] = []
        line = first - 1
        while line in full:
            above.insert(0, full[line])
            line -= 1
        after = [trailing[n] for n in range(first, last + 1) if n in trailing]
        parts = above + after
        text = _sentence(_markdown(" ".join(p for p in parts if p)))
        return FieldDoc(text, any(_DEPRECATED_RE.match(p) for p in parts))
    return FieldDoc("", False)


def _docstring(cls: type) -> str:
    doc = cls.__doc__
    if not doc or any(doc is b.__doc__ for b in cls.__mro__[1:]):
        return ""
    text = _markdown(" ".join(inspect.cleandoc(doc).split()))
    return re.sub(r"^`\[\w+\]`: (\w)", lambda m: m.group(1).upper(), text)  # "`[api]`: limits" -> "Limits"


def _sentence(text: str) -> str:
    return text + "." if text and text[-1] not in ".!?`" else text


def _markdown(text: str) -> str:
    """Source text as Markdown: reST literals become code spans, the first letter a capital."""
    text = text.replace("``", "`")
    return text[:1].upper() + text[1:]


# --- types, defaults, constraints -----------------------------------------------------------------


def _num(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _bounds(t: Any) -> list[str]:
    out = []
    for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
        v = getattr(t, attr, None)
        if v is not None:
            out.append(f"{sym} {_num(v)}")
    if getattr(t, "min_length", None) is not None:
        out.append(f"at least {t.min_length} long")
    if getattr(t, "max_length", None) is not None:
        out.append(f"at most {t.max_length} long")
    return out


def _code(text: str) -> str:
    return f"`{text}`"


def describe_type(t: Any) -> tuple[str, list[str]]:
    """(type name, constraints) of a msgspec type, as an operator writes it in TOML."""
    if isinstance(t, mi.UnionType):
        members = [u for u in t.types if not isinstance(u, mi.NoneType)]
        if len(members) == 1:
            return describe_type(members[0])
        names = [describe_type(u)[0] for u in members]
        return " or ".join(names), []
    if isinstance(t, mi.BoolType):
        return "boolean", []
    if isinstance(t, mi.IntType):
        return "integer", _bounds(t)
    if isinstance(t, mi.FloatType):
        return "number", _bounds(t)
    if isinstance(t, mi.StrType):
        extra = _bounds(t)
        if t.pattern and t.pattern.startswith("^https?://"):
            extra.append("a URL `http(s)://HOST[:PORT]`")
        elif t.pattern:
            extra.append(f"matches {_code(t.pattern)}")
        return "string", extra
    if isinstance(t, mi.LiteralType):
        return "string", ["one of " + ", ".join(_code(json.dumps(v)) for v in t.values)]
    if isinstance(t, mi.ListType | mi.SetType):
        item, extra = describe_type(t.item_type)
        return f"array of {_plural(item)}", [f"each {c}" for c in extra] + _bounds(t)
    if isinstance(t, mi.DictType):
        value, extra = describe_type(t.value_type)
        return f"table of {_plural(value)}", [f"each {c}" for c in extra]
    if isinstance(t, mi.StructType):
        return "table", []
    return type(t).__name__.removesuffix("Type").lower(), []


def _plural(name: str) -> str:
    return {"integer": "integers", "number": "numbers", "string": "strings", "boolean": "booleans"}.get(
        name, f"({name})" if " " in name else name + "s"
    )


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float | int):
        return _num(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}" if v else "{}"
    return str(v)


def describe_default(f: mi.Field, name: str) -> str:
    if f.required:
        return "**required**"
    value = f.default_factory() if f.default is msgspec.NODEFAULT else f.default
    if value is None:
        return "unset"
    if isinstance(value, msgspec.Struct):
        return "see below"
    text = _code(_toml(value))
    if name.endswith("_bytes") and isinstance(value, int) and value >= 1024:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % size == 0:
                return f"{text} ({value // size} {unit})"
    return text


# --- sections -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    header: str  # "[agent]", "[[instances]]", "[proxy.limits.MODEL]"
    cls: type
    note: str = ""


def sections_of(header: str, key: str, cls: type, note: str = "") -> Iterator[Section]:
    """The section and, after it, every table nested in it (``[[gpu.simulated]]`` ...)."""
    yield Section(header, cls, note)
    renamed = _renamed_keys().get(key, {})
    for f in mi.type_info(cls).fields:
        if f.encode_name in renamed or field_doc(cls, f.name).deprecated:
            continue  # an old name of a table: its keys are documented under the new name
        t = f.type
        while isinstance(t, mi.UnionType):
            members = [u for u in t.types if not isinstance(u, mi.NoneType)]
            t = members[0] if len(members) == 1 else None
        path = f"{key}.{f.encode_name}"
        if isinstance(t, mi.StructType):
            yield from sections_of(f"[{path}]", path, t.cls)
        elif isinstance(t, mi.ListType) and isinstance(t.item_type, mi.StructType):
            yield from sections_of(f"[[{path}]]", path, t.item_type.cls)
        elif isinstance(t, mi.DictType) and isinstance(t.value_type, mi.StructType):
            yield from sections_of(f"[{path}.NAME]", f"{path}.NAME", t.value_type.cls)


def _cell(text: str) -> str:
    return _html_safe(text).replace("|", "\\|").replace("\n", " ")


def _html_safe(text: str) -> str:
    """``<node_id>`` outside a code span would be read as an HTML tag and vanish."""
    parts = text.split("`")
    return "`".join(p if i % 2 else re.sub(r"<(?=[A-Za-z/!?])", "&lt;", p) for i, p in enumerate(parts))


def render_section(s: Section, restart_only: Collection[str] = ()) -> list[str]:
    out = [f"### `{s.header}`", ""]
    intro = " ".join(x for x in (_docstring(s.cls), s.note) if x)
    if intro:
        out += [_html_safe(intro), ""]
    out += ["| key | type | default | meaning |", "|---|---|---|---|"]
    section_key = s.header.strip("[]")
    renamed = {old: new for old, new in _renamed_keys().get(section_key, {}).items()}
    seen: list[tuple[str, str]] = []  # (key, meaning) of the fields above
    long_defaults = []
    for f in mi.type_info(s.cls).fields:
        typ, constraints = describe_type(f.type)
        if constraints:
            typ += ", " + ", ".join(constraints)
        doc = field_doc(s.cls, f.name)
        meaning = doc.text
        if not meaning:
            # One comment often explains a group of keys ("... eject_base_s, doubling up to eject_max_s"):
            # point at it rather than say nothing.
            about = next((k for k, m in reversed(seen) if re.search(rf"\b{re.escape(f.encode_name)}\b", m)), None)
            meaning = f"See `{about}` above." if about else ""
        seen.append((f.encode_name, doc.text))
        renamed_field = f.encode_name in renamed
        if _nested_struct(f.type) and not (doc.deprecated or renamed_field):
            meaning = (meaning + " " if meaning else "") + "Its keys are in the table below."
        if f"{section_key}.{f.encode_name}" in restart_only and "Read at start-up" not in meaning:
            meaning += " Read at start-up: a reload keeps the running value until a restart."
        if f.encode_name in renamed and not doc.deprecated:
            meaning = f"Deprecated name of `{renamed[f.encode_name]}`. " + meaning
        deprecated = doc.deprecated or f.encode_name in renamed
        key = f"`{f.encode_name}`" + (" *(deprecated)*" if deprecated else "")
        default = describe_default(f, f.encode_name)
        if len(default) > 60:
            long_defaults.append(f"Default of `{f.encode_name}`: {default}.")
            default = "see below the table"
        out.append(f"| {key} | {_cell(typ)} | {_cell(default)} | {_cell(meaning.strip())} |")
    out.append("")
    for line in long_defaults:
        out += [line, ""]
    return out


def _renamed_keys() -> dict[str, dict[str, str]]:
    """section -> {deprecated name: name}, from the agent's RENAMED_KEYS (whose values are the new
    name, or a tuple that starts with it)."""
    renamed: dict[str, dict[str, Any]] = getattr(agent_config, "RENAMED_KEYS", {})
    return {
        section: {old: new if isinstance(new, str) else new[0] for old, new in keys.items()}
        for section, keys in renamed.items()
    }


def _nested_struct(t: Any) -> bool:
    """A table, an array of tables or a table of tables: documented in a table of its own."""
    while isinstance(t, mi.UnionType):
        members = [u for u in t.types if not isinstance(u, mi.NoneType)]
        t = members[0] if len(members) == 1 else None
    return (
        isinstance(t, mi.StructType)
        or (isinstance(t, mi.ListType) and isinstance(t.item_type, mi.StructType))
        or (isinstance(t, mi.DictType) and isinstance(t.value_type, mi.StructType))
    )


def deprecated_keys(groups: list[tuple[str, list[Section]]]) -> list[str]:
    out = []
    renamed = _renamed_keys()
    for title, sections in groups:
        where = title.split(" (")[0]
        for s in sections:
            section_key = s.header.strip("[]")
            for f in mi.type_info(s.cls).fields:
                doc = field_doc(s.cls, f.name)
                new = renamed.get(section_key, {}).get(f.encode_name) if sections is groups[0][1] else None
                if new is not None and not doc.deprecated:
                    out.append(f"{where}: `{section_key}.{f.encode_name}`: renamed `{new}`. {doc.text}".rstrip())
                elif new is not None or doc.deprecated:
                    out.append(f"{where}: `{section_key}.{f.encode_name}`: {doc.text}")
    return out


# --- the document ---------------------------------------------------------------------------------


def agent_sections() -> list[Section]:
    restart = set(agent_config.RESTART_ONLY)
    out: list[Section] = []
    for name, cls in agent_config.SECTIONS.items():
        note = (
            "Read at start-up: a reload keeps the running values until a restart."
            if name in restart
            else "A reload (`systemctl reload gpu-agent`) applies it."
        )
        out += sections_of(f"[{name}]", name, cls, note)
    out += sections_of(
        "[[instances]]",
        "instances",
        agent_config.InstanceConfig,
        "One model server each; a reload starts, stops and replaces instances to match the file.",
    )
    return out


def coordinator_sections() -> list[Section]:
    out: list[Section] = []
    for name, cls in coordinator_config.SECTIONS.items():
        if name not in coordinator_config.POLICY_SECTIONS:
            out += sections_of(f"[{name}]", name, cls)
    return out


def policy_sections() -> list[Section]:
    out: list[Section] = []
    for name, cls in policyconfig.SECTIONS.items():
        out += sections_of(f"[{name}]", name, cls)
    return out


INTRO = f"""# Configuration reference

Generated from the config Structs and the comments beside their fields; do not edit by hand.
Regenerate with `{REGENERATE}` (a test fails while this file is out of date).

Every file is TOML. An unknown section or key is an error, and `check-config` lists every problem
at once as `FILE: $.path: message`, exiting 78 (`gpu-agent check-config FILE`,
`gpu-coordinator check-config FILE`). Relative paths are resolved against the file's directory.

Three kinds of settings:

- **Agent, local** (`/etc/gpu-agent/agent.toml`): one file per GPU host.
- **Coordinator, local** (`/etc/gpu-coordinator/coordinator.toml`): identity, listen address,
  etcd and election settings of one replica; each replica has its own.
- **Cluster policy, in etcd** (`/gpufleet/<cluster>/config`): `[health]`, `[weights]`,
  `[failover]`, `[placement]`, `[degradation]` of the coordinators. Every coordinator applies the
  one record in etcd, so replicas never disagree; a coordinator file's copy of these sections only
  bootstraps a new cluster. Change them with `gpuctl config set SECTION.KEY=VALUE` or
  `gpuctl config edit`, which validate with the same rules as below. (The agent's own
  `[degradation]` is a different, local section: how its proxy applies the cluster's level.)

"Unset" means the key is absent; the meaning column says what applies then.
"""


def render() -> str:
    groups = [
        ("Agent (`/etc/gpu-agent/agent.toml`)", agent_sections()),
        ("Coordinator, local (`/etc/gpu-coordinator/coordinator.toml`)", coordinator_sections()),
        (
            "Cluster policy (etcd `/gpufleet/<cluster>/config`; bootstrap from the coordinator file)",
            policy_sections(),
        ),
    ]
    out = [INTRO]
    for title, sections in groups:
        out.append(f"- [{title}](#{_anchor(title)}): " + ", ".join(f"`{s.header}`" for s in sections))
    out.append("")
    deprecated = deprecated_keys(groups)
    out += ["## Deprecated keys", ""]
    if deprecated:
        out += ["Accepted so that existing files still load; `check-config` and start-up warn to remove them.", ""]
        out += [f"- {d}" for d in deprecated]
    else:
        out.append("None.")
    out.append("")
    for title, sections in groups:
        out += [f"## {title}", ""]
        for s in sections:
            out += render_section(s, agent_config.RESTART_ONLY if sections is groups[0][1] else ())
    return "\n".join(out).rstrip() + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
