"""Files the package ships for operators: the example configs (``examples/*.toml``) and the
systemd units (``systemd/*.service``). ``gpuctl files`` lists and prints them; ``gpuctl demo
--standalone`` runs ``examples/standalone-demo.toml`` from here.

One copy of each file: they live at the top of the repository, where the README, the Ansible
role and someone browsing the source look for them; ``examples`` and ``systemd`` in this
directory are symlinks to those, which the wheel build follows (pyproject.toml, package-data),
so an installed wheel holds them as plain files under ``site-packages/gpufleet/data/``.

Paths, not ``importlib.resources`` traversables: every consumer needs a file on disk (the agent
takes ``--config PATH``, an operator copies a unit), and pip always installs a wheel unpacked.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("examples", "systemd")  # the directories shipped, each flat


def shipped() -> dict[str, Path]:
    """Every shipped file: name (``systemd/gpu-agent.service``) -> its path on disk, sorted."""
    return {
        f"{kind}/{p.name}": p.resolve()
        for kind in KINDS
        for p in sorted((HERE / kind).iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def find(name: str) -> Path:
    """A shipped file by its name or base name (``gpu-agent.service``); KeyError names the
    choices."""
    files = shipped()
    if name in files:
        return files[name]
    by_base = {n.split("/", 1)[1]: p for n, p in files.items()}
    if name in by_base:
        return by_base[name]
    raise KeyError(f"no shipped file {name!r}; one of: {', '.join(files)}")


def example(name: str) -> Path:
    return find(f"examples/{name}")
