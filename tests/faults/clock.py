"""A process with its own wall clock: libfaketime, with the offset read from a file on every call.

``FakeClock(tmp).wrapper()`` is a command prefix (``env LD_PRELOAD=... FAKETIME_...``) for a
daemon; ``jump(seconds)`` steps that daemon's CLOCK_REALTIME by an offset from the real time,
as an NTP step or a VM resumed with a stale clock would. The monotonic clock is left alone
(``FAKETIME_DONT_FAKE_MONOTONIC``), as it is on a real host.

libfaketime 0.9.10 breaks ``time.sleep`` in that mode (clock_nanosleep with an absolute
monotonic deadline returns EINVAL). The daemons under test never call it (asyncio waits in
epoll, threads wait on conditions), so a stray call shows up as a crash, not as a silent pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
requires_libfaketime = pytest.mark.skipif(
    not LIBFAKETIME.exists(), reason="libfaketime not installed (scripts/bootstrap installs Debian's faketime)"
)


class FakeClock:
    def __init__(self, directory: Path, name: str = "clock") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{name}.faketime"
        self.jump(0)

    def jump(self, offset_s: float) -> None:
        """From now on the wrapped process's wall clock reads real time + ``offset_s``."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{offset_s:+.0f}\n")
        tmp.replace(self.path)  # atomic: the library never reads half a line

    def wrapper(self) -> list[str]:
        return [
            "env",
            f"LD_PRELOAD={LIBFAKETIME}",
            f"FAKETIME_TIMESTAMP_FILE={self.path}",
            "FAKETIME_NO_CACHE=1",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
        ]
