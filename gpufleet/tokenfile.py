"""Who else can use a secret token file: the permission checks behind the agent's admin token
(refused at start-up and per request, warned about by ``check-config`` and ``gpuctl check``).

A token file others can read is a warning: anyone on the host can then use the token. One
others can *write* is an error (fail closed): anyone could set the token to one they know.
"""

from __future__ import annotations

import os
import stat


def permission_problems(st: os.stat_result, path: object) -> tuple[list[str], list[str]]:
    """(errors, warnings) about who else can use the token file: errors refuse it."""
    errors, warnings = [], []
    if st.st_mode & stat.S_IWOTH:
        errors.append(
            f"admin token file {path} is writable by every user (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600"
        )
    if st.st_mode & stat.S_IWGRP:
        warnings.append(f"admin token file {path} is writable by its group (mode {stat.S_IMODE(st.st_mode):04o})")
    if st.st_mode & stat.S_IROTH:
        warnings.append(
            f"admin token file {path} is readable by every user (mode {stat.S_IMODE(st.st_mode):04o}): "
            "anyone on this host can use the admin API; chmod 600"
        )
    return errors, warnings


def token_file_problems(path: str | None) -> tuple[list[str], list[str]]:
    """(errors, warnings) for ``check-config`` and ``gpuctl check``; nothing when there is no
    file yet (``admin_token_generate`` creates it 0600)."""
    if not path:
        return [], []
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [], []
    except OSError as e:
        return [f"cannot read admin token file {path}: {e.strerror or e}"], []
    return permission_problems(st, path)
