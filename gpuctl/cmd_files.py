"""gpuctl files [NAME]: the example configs and systemd units this installation ships.

Without NAME, a list of the files and where they are on disk. With NAME (gpu-agent.service or
systemd/gpu-agent.service), the file on stdout, ready for a redirect:

    gpuctl files gpu-agent.service > /etc/systemd/system/gpu-agent.service
    gpuctl files vllm-two-instances.toml > agent.toml

A unit is printed for this installation: the shipped files start the daemons from
/opt/gpufleet/venv/bin (where the Ansible role and the README install), and that directory is
replaced by the one holding this installation's scripts, so a unit printed by a virtualenv
elsewhere starts that virtualenv's daemons. The list shows the files as shipped.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

from gpufleet import data

from . import common as ctl

SHIPPED_SCRIPTS = "/opt/gpufleet/venv/bin/"  # what the units' ExecStart= names


def unit_for_installation(text: str, scripts: Path) -> str:
    return text.replace(SHIPPED_SCRIPTS, f"{scripts}/")


def cmd_files(args: argparse.Namespace) -> int:
    if args.name is None:
        files = data.shipped()
        ctl.emit(
            args,
            [{"name": n, "path": str(p)} for n, p in files.items()],
            ctl.render_table([[n, str(p)] for n, p in files.items()], ["NAME", "PATH"]),
        )
        return ctl.EXIT_OK
    try:
        path = data.find(args.name)
    except KeyError as e:
        raise ctl.UsageError(e.args[0]) from None
    text = path.read_text()
    if path.suffix == ".service":
        scripts = Path(sysconfig.get_path("scripts"))
        if (scripts / "gpu-agent").exists():
            text = unit_for_installation(text, scripts)
        else:  # e.g. run from a source tree with no console scripts installed
            print(f"warning: no gpu-agent in {scripts}; ExecStart= left as shipped", file=sys.stderr)
        if scripts.is_relative_to("/home") or scripts.is_relative_to("/root"):
            print(f"warning: the unit's ProtectHome=yes hides {scripts} from the service", file=sys.stderr)
    sys.stdout.write(text)
    return ctl.EXIT_OK


def add_file_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    files = sub.add_parser(
        "files",
        help="the example configs and systemd units shipped with gpufleet: list them, or print one",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    files.add_argument("name", nargs="?", help="a file to print (e.g. gpu-agent.service); none: list them")
    files.set_defaults(func=cmd_files)
