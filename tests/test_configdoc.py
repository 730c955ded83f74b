"""docs/config.md is generated from the config Structs; it must say what the code does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
from msgspec import inspect as mi

from gpufleet_dev import configdoc

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "config.md"


def test_the_config_reference_is_current() -> None:
    expected = configdoc.render()
    actual = DOC.read_text() if DOC.exists() else ""
    assert actual == expected, (
        f"docs/config.md is out of date with the config Structs; regenerate it: {configdoc.REGENERATE}"
    )


def test_the_generator_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gpufleet_dev.configdoc"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout == configdoc.render()


def test_every_key_of_every_file_is_in_the_reference() -> None:
    text = configdoc.render()
    groups = {
        "## Agent": configdoc.agent_sections(),
        "## Coordinator, local": configdoc.coordinator_sections(),
        "## Cluster policy": configdoc.policy_sections(),
    }
    for title, sections in groups.items():
        part = text[text.index(title) :]
        for s in sections:
            table = part[part.index(f"### `{s.header}`") :]
            table = table[: table.find("\n### ") if "\n### " in table else None]
            for f in mi.type_info(s.cls).fields:
                assert f"| `{f.encode_name}`" in table, (s.header, f.encode_name)


class _Example(msgspec.Struct, kw_only=True):
    """A section for the generator's own test."""

    # Two lines above the field,
    # joined into one text.
    first: int = 1  # and its trailing comment
    second: str = "x"  # see first
    third: list[int] = []
    later: int = 3  # says what fourth does too
    fourth: int = 4
    # Deprecated: use first.
    old: int | None = None


def test_field_docs_come_from_the_comments_beside_each_field() -> None:
    assert configdoc.field_doc(_Example, "first") == configdoc.FieldDoc(
        "Two lines above the field, joined into one text. and its trailing comment.", False
    )
    assert configdoc.field_doc(_Example, "third").text == ""
    assert configdoc.field_doc(_Example, "old") == configdoc.FieldDoc("Deprecated: use first.", True)
    lines = configdoc.render_section(configdoc.Section("[example]", _Example))
    assert lines[:3] == ["### `[example]`", "", "A section for the generator's own test."]
    row = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| `")}
    assert row["`third`"] == "| `third` | array of integers | `[]` |  |"
    assert row["`fourth`"] == "| `fourth` | integer | `4` | See `later` above. |"  # a comment about a group
    assert row["`old` *(deprecated)*"].startswith("| `old` *(deprecated)* | integer | unset | Deprecated: use first.")


def test_types_and_constraints_are_said_as_an_operator_writes_them() -> None:
    from agent.config import InstanceConfig, ProxySection

    fields = {f.name: f for f in mi.type_info(InstanceConfig).fields}
    assert configdoc.describe_type(fields["backend"].type)[1] == [
        'one of `"command"`, `"koboldcpp"`, `"llamacpp"`, `"ollama"`, `"vllm"`'
    ]
    assert configdoc.describe_type(fields["gpu_memory_fraction"].type) == ("number", ["> 0", "≤ 1"])
    assert configdoc.describe_type(fields["gpus"].type) == ("array of integers", ["each ≥ 0"])
    assert configdoc.describe_default(fields["name"], "name") == "**required**"
    proxy = {f.name: f for f in mi.type_info(ProxySection).fields}
    assert configdoc.describe_default(proxy["max_body_bytes"], "max_body_bytes") == "`33554432` (32 MiB)"
