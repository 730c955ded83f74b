"""The one TOML writer: config files are built as dicts and written by ``tomli-w``, never by f-strings.

A value with a quote, a backslash or a newline is escaped by the writer, so what is read back is
what was meant. ``None`` means "not given" and is left out (TOML has no null); paths become strings.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import tomli_w


def _clean(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items() if x is not None}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, PurePath):
        return str(v)
    return v


def dumps(doc: dict[str, Any], comment: str | None = None) -> str:
    """``doc`` as TOML text; ``comment`` becomes a leading ``# ...`` line."""
    text = tomli_w.dumps(_clean(doc))
    return f"# {comment}\n{text}" if comment else text
