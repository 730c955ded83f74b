"""What both demos share: where they keep their state, the admin token, serving until stopped.

The state lives under the working directory (``./.gpufleet-demo/``), never next to the source:
from an installed wheel the source is site-packages. Each run starts from an empty directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .fleetbase import Daemon, FleetError

DEMO_DIRNAME = ".gpufleet-demo"


def demo_dir(kind: str) -> Path:
    """``./.gpufleet-demo/<kind>`` (``cluster`` or ``standalone``), emptied: a fresh start."""
    path = Path.cwd() / DEMO_DIRNAME / kind
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_token(path: Path) -> Path:
    """A random admin token, readable by this user only (as the agent requires)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(24).hex() + "\n")
    return path


class StopFlag:
    """Ctrl-C / SIGTERM ask the demo to stop; the demo then stops what it started. While the demo
    starts up they raise KeyboardInterrupt (out of whatever it waits for); once it serves they set
    the flag the serving loop checks."""

    def __init__(self) -> None:
        self.set = False
        self.serving = False
        signal.signal(signal.SIGINT, self._on)
        signal.signal(signal.SIGTERM, self._on)

    def _on(self, *_: object) -> None:
        self.set = True
        if not self.serving:
            raise KeyboardInterrupt

    def serve(self, daemons: Sequence[Daemon], duration: float, every: Callable[[float], None] | None = None) -> int:
        """Until stopped, ``duration`` passes (0 = forever) or a daemon dies (an error: exit 1).
        ``every(elapsed)`` runs on each pass (the chaos)."""
        self.serving = True
        started = time.monotonic()
        while not self.set and (not duration or time.monotonic() - started < duration):
            dead = next((d for d in daemons if d.proc is not None and not d.running()), None)
            if dead is not None:
                code = dead.proc.returncode if dead.proc else "?"
                print(f"error: {dead.name} exited with {code}; see {dead.log_path}", file=sys.stderr)
                return 1
            if every is not None:
                every(time.monotonic() - started)
            time.sleep(0.2)
        return 0


def run_demo(body: Callable[[StopFlag], int], cleanup: Callable[[], None]) -> int:
    """``body(stop)``'s exit code; a harness failure is reported (exit 1), Ctrl-C while starting up
    is 130; ``cleanup()`` (stopping what was started) runs whatever happens."""
    stop = StopFlag()
    try:
        return body(stop)
    except FleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        stop.serving = True  # a second Ctrl-C while stopping does not cut the stop short
        cleanup()
