"""The usage journal: one line per keyed request that ended at this entry node, written before
the client has the end of its answer and rolled up into the node's usage record (rollup.py).

Layout, in ``<state_dir>/usage/``::

    journal-id              a random id made once: a wiped state directory is a new journal
    seg-<first seq>.jsonl   the segments; the last one is being written
    rolled.json             a standalone agent's usage record (rollup.FileUsageStore)

A line is ``[seq, at, key, model, status, prompt_tokens, completion_tokens]``. Appending is one
``os.write`` on an ``O_APPEND`` descriptor and no fsync: a line that ``write`` returned for is in
the page cache, so a kill -9 of the agent loses nothing; a power loss (or kernel crash) can lose
what the kernel had not written back yet (up to ``vm.dirty_expire_centisecs``, 30 s by default)
of the lines not rolled up yet. Sequence numbers only grow: each segment is named after its
first one and its creation is fsynced (file and directory), so after any crash the names say
where to go on, and a roll-up's ``covers`` can never be taken for newer lines.

Replay (at start, and ``gpuctl usage --state-dir``) skips a line that does not decode — the
torn end of a write cut by a crash, or a power loss's zeros — and says so in the log.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog

from gpufleet.fileio import atomic_write_bytes

log = structlog.get_logger("agent.keys.usage")

ID_FILE = "journal-id"
_SEGMENT = "seg-"
_SUFFIX = ".jsonl"

# (key, model, hour) -> [requests, errors, prompt_tokens, completion_tokens]
BucketKey = tuple[str, str, int]
Totals = dict[BucketKey, list[int]]


class Entry(msgspec.Struct, array_like=True, frozen=True):
    seq: int
    at: float  # unix time the request was billed
    key: str
    model: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Entry)


def hour_of(at: float) -> int:
    return int(at // 3600) * 3600


def add_entry(totals: Totals, e: Entry) -> None:
    counts = totals.setdefault((e.key, e.model, hour_of(e.at)), [0, 0, 0, 0])
    counts[0] += 1
    counts[1] += 1 if e.status >= 400 or e.status <= 0 else 0
    counts[2] += e.prompt_tokens
    counts[3] += e.completion_tokens


@dataclass
class Segment:
    path: Path
    first: int  # the sequence number the segment starts at (its name)
    last: int  # the last one in it; first - 1 while empty
    totals: Totals = field(default_factory=dict)

    def entries(self) -> list[Entry]:
        return parse_segment(self.path)[0]


def segment_path(directory: Path, first: int) -> Path:
    return directory / f"{_SEGMENT}{first:016d}{_SUFFIX}"


def parse_segment(path: Path) -> tuple[list[Entry], int]:
    """The entries of one segment file, and how many lines were skipped as unreadable."""
    entries: list[Entry] = []
    bad = 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip(b"\0 \t\r"):
            continue
        try:
            entries.append(_decoder.decode(line))
        except (msgspec.DecodeError, msgspec.ValidationError):
            bad += 1
    return entries, bad


def read_segments(directory: Path) -> list[Segment]:
    """Every segment in ``directory``, oldest first, with its entries summed (read-only)."""
    found = []
    for path in directory.glob(f"{_SEGMENT}*{_SUFFIX}"):
        try:
            first = int(path.name[len(_SEGMENT) : -len(_SUFFIX)])
        except ValueError:
            continue
        found.append((first, path))
    segments = []
    for first, path in sorted(found):
        entries, bad = parse_segment(path)
        if bad:
            log.warning("usage journal: unreadable lines skipped (a write cut by a crash)", file=str(path), lines=bad)
        seg = Segment(path, first, first - 1)
        for e in entries:
            if e.seq < first:
                log.warning("usage journal: line out of its segment skipped", file=str(path), seq=e.seq)
                continue
            add_entry(seg.totals, e)
            seg.last = max(seg.last, e.seq)
        segments.append(seg)
    return segments


def totals_after(segments: list[Segment], covered: int) -> tuple[Totals, int]:
    """The entries of ``segments`` past sequence number ``covered`` summed, and the last one."""
    totals: Totals = {}
    last = covered
    for seg in segments:
        last = max(last, seg.last)
        if seg.last <= covered:
            continue
        if seg.first > covered:
            for k, counts in seg.totals.items():
                into = totals.setdefault(k, [0, 0, 0, 0])
                for i in range(4):
                    into[i] += counts[i]
        else:  # a segment the record covers in part (rare): its lines, one by one
            for e in seg.entries():
                if e.seq > covered:
                    add_entry(totals, e)
    return totals, last


def read_journal_id(directory: Path) -> str | None:
    try:
        return (directory / ID_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UsageJournal:
    """Appended to on the event loop (``append``: one write, a few µs), read by the roll-up."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.journal_id = ""
        self.sealed: list[Segment] = []  # written, waiting for a roll-up to be acknowledged
        self._active: Segment | None = None
        self._fd = -1
        self._next = 1
        self._torn = False  # the last write failed part-way: start the next on a new line

    def open(self) -> None:
        """Replay what is on disk and start a new segment. Raises OSError (the directory named)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        journal_id = read_journal_id(self.directory)
        if journal_id is None:
            journal_id = secrets.token_hex(8)
            atomic_write_bytes(self.directory / ID_FILE, journal_id.encode() + b"\n", 0o600)
            _fsync_dir(self.directory)
        self.journal_id = journal_id
        self.sealed = read_segments(self.directory)
        self._next = max([1] + [s.last + 1 for s in self.sealed] + [s.first for s in self.sealed])
        if self.sealed and self.sealed[-1].first == self._next:
            # The last segment has no whole line (empty, or only a torn one): start it afresh.
            self.sealed.pop().path.unlink()
        self._start_segment()
        pending = sum(c[0] for s in self.sealed for c in s.totals.values())
        log.info("usage journal open", dir=str(self.directory), journal=journal_id, requests_not_rolled_up=pending)

    def _start_segment(self) -> None:
        path = segment_path(self.directory, self._next)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        os.fsync(fd)
        _fsync_dir(self.directory)  # the name (our next sequence number) survives a power loss
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._active = Segment(path, self._next, self._next - 1)
        self._torn = False

    def append(self, at: float, key: str, model: str, status: int, prompt_tokens: int, completion_tokens: int) -> None:
        """Record one billed request. Never raises: a failed write is logged, and the request is
        still counted by the roll-up of this process (only a restart before it would lose it)."""
        active = self._active
        assert active is not None, "append before open"
        e = Entry(self._next, at, key, model, status, prompt_tokens, completion_tokens)
        self._next += 1
        add_entry(active.totals, e)
        active.last = e.seq
        line = _encoder.encode(e) + b"\n"
        try:
            written = os.write(self._fd, b"\n" + line if self._torn else line)
            self._torn = written < len(line)
        except OSError as error:
            self._torn = True
            log.error("usage journal write failed; counted until a restart only", error=str(error), key=key)

    def has_unsealed(self) -> bool:
        return self._active is not None and self._active.last >= self._active.first

    def seal(self) -> None:
        """Hand the segment being written to the roll-up and start the next one. Only while no
        sealed segment waits (etcd away: one segment grows instead of a file per attempt)."""
        if self.sealed or not self.has_unsealed():
            return
        old = self._active
        assert old is not None
        self._start_segment()  # first: if it fails, the lines go on into the old one
        self.sealed.append(old)

    def after(self, covered: int) -> tuple[Totals, int]:
        """The sealed entries past ``covered`` summed, and the last sealed sequence number."""
        return totals_after(self.sealed, covered)

    def release(self, covered: int) -> None:
        """The usage record holds every sealed line up to ``covered``: drop those segments."""
        keep = []
        for seg in self.sealed:
            if seg.last <= covered:
                seg.path.unlink(missing_ok=True)
            else:
                keep.append(seg)
        self.sealed = keep

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
