"""Log lines carry their sd-daemon priority when stderr is systemd's journal stream.

journald files every line of a service's stderr at info unless it starts with ``<N>``. The
daemons detect the journal the way sd_journal_stream_fd(3) documents (``JOURNAL_STREAM`` is
``<st_dev>:<st_ino>`` of stderr) and prefix every line; anywhere else the output is unchanged.
Each case runs in a subprocess whose stderr is a file standing in for the journal stream.
A log stream that fails (stderr on a full disk) drops and counts lines and never raises.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet import logsetup
from gpufleet.logsetup import LineWriter

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys
from gpufleet.logsetup import configure_logging, print_error
import structlog
configure_logging(sys.argv[1], "debug")
log = structlog.get_logger("t")
log.debug("d-event")
log.info("i-event", n=1)
log.warning("w-event")
log.error("e-event", problem="bad")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("x-event")
log.critical("c-event")
print_error("config.toml: $.a: first\\nconfig.toml: $.b: second")
"""


def _run(tmp_path: Path, fmt: str, journal: str | None) -> list[str]:
    err = tmp_path / f"stderr-{fmt}-{journal is not None}"
    err.touch()
    st = err.stat()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal == "match":
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    elif journal == "other":
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"  # stderr redirected away from the journal
    with open(err, "wb") as f:
        subprocess.run(
            [sys.executable, "-c", SCRIPT, fmt], stderr=f, stdout=subprocess.DEVNULL, env=env, cwd=ROOT, check=True
        )
    return err.read_text().splitlines()


def test_json_lines_carry_their_priority_under_journald(tmp_path: Path) -> None:
    lines = _run(tmp_path, "json", "match")
    events = {}
    for line in lines[:-2]:
        assert line[0] == "<" and line[2] == ">", line
        events[json.loads(line[3:])["event"]] = int(line[1])
    assert events == {"d-event": 7, "i-event": 6, "w-event": 4, "e-event": 3, "x-event": 3, "c-event": 2}
    # The traceback stays inside the JSON line (one journal entry at error priority).
    x = next(json.loads(ln[3:]) for ln in lines if '"x-event"' in ln)
    assert "ValueError: boom" in x["exception"]
    assert lines[-2:] == ["<3>config.toml: $.a: first", "<3>config.toml: $.b: second"]


def test_every_console_line_is_prefixed_including_tracebacks(tmp_path: Path) -> None:
    lines = _run(tmp_path, "console", "match")
    assert all(ln[:1] == "<" and ln[2:3] == ">" for ln in lines), lines
    tb = [ln for ln in lines if "Traceback" in ln or "ValueError: boom" in ln]
    assert tb and all(ln.startswith("<3>") for ln in tb)
    assert next(ln for ln in lines if "i-event" in ln).startswith("<6>")
    assert next(ln for ln in lines if "w-event" in ln).startswith("<4>")


@pytest.mark.parametrize("journal", [None, "other"], ids=["no-journal", "stderr-redirected"])
def test_no_prefix_unless_stderr_is_the_journal(tmp_path: Path, journal: str | None) -> None:
    lines = _run(tmp_path, "json", journal)
    assert [json.loads(ln)["event"] for ln in lines[:-2]] == [
        "d-event",
        "i-event",
        "w-event",
        "e-event",
        "x-event",
        "c-event",
    ]
    assert lines[-2:] == ["config.toml: $.a: first", "config.toml: $.b: second"]


# --- a failing log stream (a full disk) ---------------------------------------------------------


def _writer(fd: int, journal: Path) -> LineWriter:
    return LineWriter(fd, lambda level, fields: json.dumps({"level": level, **fields}), str(journal))


def test_a_failing_log_drops_counts_says_so_once_and_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr on a full disk (/dev/full answers every write with ENOSPC): no log call raises, the
    lines are counted, the journal hears it once, and once writes work again (the descriptor now
    points at a file) the first line is a notice of how many were lost."""
    journal = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(journal))
        listener.setblocking(False)
        fd = os.open("/dev/full", os.O_WRONLY)
        try:
            w = _writer(fd, journal)
            for i in range(5):
                w.info(b'{"event":"lost %d"}' % i)
            w.error("text lines too")
            assert w.dropped_lines == 6
            said = listener.recv(4096).decode()
            assert "MESSAGE=log writes failing (No space left on device)" in said and "PRIORITY=4" in said
            with pytest.raises(BlockingIOError):
                listener.recv(4096)  # once, not per line

            out = tmp_path / "out.log"
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT), fd)  # space freed
            w.info(b'{"event":"during back-off"}')
            assert w.dropped_lines == 7 and out.read_bytes() == b""  # not retried before RETRY_S
            monkeypatch.setattr(logsetup.time, "monotonic", lambda: 1e12)
            w.info(b'{"event":"back"}')
            w.info(b'{"event":"again"}')
        finally:
            os.close(fd)
    notice, back, again = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert notice["event"] == "agent log lines dropped" and notice["dropped_lines"] == 7
    assert notice["error"] == "No space left on device" and notice["level"] == "warning"
    assert (back["event"], again["event"]) == ("back", "again")
    assert w.dropped_lines == 7


def test_the_agent_log_on_a_full_disk_never_raises(tmp_path: Path) -> None:
    """configure_logging's own chain, stderr being /dev/full: every level, exceptions included,
    returns normally; the count is what the metric exports."""
    script = (
        "import structlog, sys\n"
        "from gpufleet.logsetup import configure_logging, dropped_lines\n"
        "configure_logging('json', 'debug')\n"
        "log = structlog.get_logger('t')\n"
        "log.info('a'); log.warning('b'); log.error('c')\n"
        "try:\n    raise ValueError('x')\nexcept ValueError:\n    log.exception('d')\n"
        "print(dropped_lines())\n"
    )
    with open("/dev/full", "wb") as full:
        r = subprocess.run(
            [sys.executable, "-c", script], stderr=full, capture_output=False, stdout=subprocess.PIPE, cwd=ROOT
        )
    assert r.returncode == 0 and r.stdout.strip() == b"4"


def test_instance_output_on_a_failing_disk_is_dropped_counted_and_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance log (agent/supervisor/process.py) on /dev/full: writes never raise, the tail
    for error reports is still kept, lines are counted; when a retry finds a working file, it
    starts with a line saying what is missing."""
    from agent.supervisor.process import RotatingLog

    out = RotatingLog(Path("/dev/full"), max_bytes=1 << 20, backups=1)
    out.mark("starting")
    out.write(b"INFO one\nINFO two\nINFO thr")
    out.write(b"ee\n")
    assert out.dropping and out.dropped_lines == 4 and list(out.tail) == ["INFO one", "INFO two", "INFO three"]
    out.path = tmp_path / "a.log"  # the next retry opens a file that works: space was freed
    monkeypatch.setattr("agent.supervisor.process.time.monotonic", lambda: 1e12)
    out.write(b"INFO four\n")
    out.close()
    lines = out.path.read_text().splitlines()
    assert lines[0].startswith("--- gpu-agent: 4 lines of output dropped since ")
    assert lines[0].endswith("(No space left on device) ---") and lines[1:] == ["INFO four"]
    assert not out.dropping and out.dropped_lines == 4
