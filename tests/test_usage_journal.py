"""The usage journal and its roll-up (agent/keys/journal.py, rollup.py), and ``gpuctl usage``'s
sums: replay, torn lines, sequence numbers that never go back, exactly-once roll-ups through
unknown write outcomes and crashes between the write and the delete, folding old hours, and
the size bound."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.keys.journal import UsageJournal, hour_of, read_segments
from agent.keys.rollup import FileUsageStore, UsageRoller, UsageStoreError, merged
from agent.keys.usage import StreamUsage, Usage, ends_stream
from gpuctl.cmd_usage import local_record, report
from gpufleet.etcd import EtcdTimeout
from gpufleet.keyspace import encode
from gpufleet.keyspace.records import UsageRecord

NOW = 1_790_000_000.0  # a fixed clock: hour buckets are deterministic


class MemoryStore:
    """A store with etcd's compare-and-swap; ``lose_ack`` makes the next save apply and then
    raise, as an etcd call that timed out after the write was committed."""

    def __init__(self) -> None:
        self.record: UsageRecord | None = None
        self.version = 0
        self.lose_ack = False
        self.saves = 0

    async def load(self) -> tuple[UsageRecord | None, object]:
        return self.record, self.version

    async def save(self, record: UsageRecord, version: object) -> bool:
        if version != self.version:
            return False
        self.record, self.version = record, self.version + 1
        self.saves += 1
        if self.lose_ack:
            self.lose_ack = False
            raise EtcdTimeout("deadline exceeded (the write was applied)")
        return True


def opened(path: Path) -> UsageJournal:
    j = UsageJournal(path)
    j.open()
    return j


def sums(rec: UsageRecord | None) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    out: dict[tuple[str, str], list[int]] = {}
    for r in rec.rows if rec is not None else []:
        acc = out.setdefault((r.key, r.model), [0, 0, 0, 0])
        for i, v in enumerate((r.requests, r.errors, r.prompt_tokens, r.completion_tokens)):
            acc[i] += v
    return {k: (v[0], v[1], v[2], v[3]) for k, v in out.items()}


def test_replay_after_a_kill_keeps_every_line_and_goes_on_numbering(tmp_path: Path) -> None:
    j = opened(tmp_path)
    j.append(NOW, "team", "m", 200, 10, 5)
    j.append(NOW, "team", "m", 500, 0, 0)
    j.append(NOW + 1, "other", "m", 200, 3, 4)
    # No close: a kill -9 leaves what write() returned for in the page cache, nothing more.
    again = opened(tmp_path)
    totals, last = again.after(0)
    assert last == 3
    assert totals == {("team", "m", hour_of(NOW)): [2, 1, 10, 5], ("other", "m", hour_of(NOW + 1)): [1, 0, 3, 4]}
    again.append(NOW, "team", "m", 200, 1, 1)
    assert again.has_unsealed()
    again.seal()  # nothing: the replayed lines wait for their roll-up first
    assert again.after(3) == ({}, 3)
    again.release(3)
    again.seal()
    assert again.after(3) == ({("team", "m", hour_of(NOW)): [1, 0, 1, 1]}, 4)


def test_a_torn_last_line_is_skipped_and_the_next_lines_start_clean(tmp_path: Path) -> None:
    j = opened(tmp_path)
    j.append(NOW, "team", "m", 200, 10, 5)
    seg = j._active
    assert seg is not None
    with open(seg.path, "ab") as f:
        f.write(b'[2,1790000000.0,"team","m",2')  # a write cut part-way by a crash
    again = opened(tmp_path)
    assert again.after(0)[0] == {("team", "m", hour_of(NOW)): [1, 0, 10, 5]}
    again.append(NOW, "team", "m", 200, 7, 7)
    fresh = opened(tmp_path)
    assert fresh.after(0)[0] == {("team", "m", hour_of(NOW)): [2, 0, 17, 12]}


def test_a_failed_write_starts_the_next_line_on_a_new_line(tmp_path: Path) -> None:
    j = opened(tmp_path)
    j.append(NOW, "team", "m", 200, 1, 1)
    os.close(j._fd)  # the write fails (EBADF): logged, still counted by this process
    j.append(NOW, "team", "m", 200, 2, 2)
    j._fd = os.open(j._active.path, os.O_WRONLY | os.O_APPEND)  # type: ignore[union-attr]
    j.append(NOW, "team", "m", 200, 4, 4)
    j.seal()
    assert j.after(0)[0] == {("team", "m", hour_of(NOW)): [3, 0, 7, 7]}  # in memory: all three
    assert opened(tmp_path).after(0)[0] == {("team", "m", hour_of(NOW)): [2, 0, 5, 5]}  # on disk: two


def test_sequence_numbers_never_go_back_after_segments_are_released(tmp_path: Path) -> None:
    j = opened(tmp_path)
    for _ in range(5):
        j.append(NOW, "team", "m", 200, 1, 1)
    j.seal()
    assert j.after(0)[1] == 5
    j.release(5)
    assert [s.first for s in read_segments(tmp_path)] == [6]  # the empty active one names seq 6
    again = opened(tmp_path)
    again.append(NOW, "team", "m", 200, 1, 1)
    again.seal()
    assert again.after(5) == ({("team", "m", hour_of(NOW)): [1, 0, 1, 1]}, 6)


def test_a_partly_covered_segment_counts_only_its_lines_past_the_mark(tmp_path: Path) -> None:
    j = opened(tmp_path)
    for i in range(4):
        j.append(NOW, "team", "m", 200, i, 0)
    j.seal()
    assert j.after(2) == ({("team", "m", hour_of(NOW)): [2, 0, 2 + 3, 0]}, 4)


async def test_roll_up_is_exactly_once_through_a_lost_ack_and_a_crash_before_the_delete(tmp_path: Path) -> None:
    store = MemoryStore()
    j = opened(tmp_path)
    for _ in range(3):
        j.append(NOW, "team", "m", 200, 10, 5)
    roller = UsageRoller(j, store, "n1")
    store.lose_ack = True
    with pytest.raises(EtcdTimeout):
        await roller.roll_once()
    assert sums(store.record) == {("team", "m"): (3, 0, 30, 15)}
    assert j.sealed  # not acknowledged: the lines stay
    await roller.roll_once()  # reads covers=3 back: adds nothing
    assert sums(store.record) == {("team", "m"): (3, 0, 30, 15)} and store.saves == 1
    assert not j.sealed

    # Written and acknowledged, then killed before the segments went: the replay adds nothing.
    j.append(NOW, "team", "m", 200, 1, 1)
    j.seal()
    store.lose_ack = True
    with pytest.raises(EtcdTimeout):
        await roller.roll_once()
    restarted = opened(tmp_path)
    await UsageRoller(restarted, store, "n1").roll_once()
    assert sums(store.record) == {("team", "m"): (4, 0, 31, 16)}
    assert store.record is not None and store.record.journals[restarted.journal_id].covers == 4


async def test_a_wiped_state_directory_is_a_new_journal_and_keeps_the_totals(tmp_path: Path) -> None:
    store = MemoryStore()
    first = opened(tmp_path / "a")
    first.append(NOW, "team", "m", 200, 10, 5)
    await UsageRoller(first, store, "n1").roll_once()
    second = opened(tmp_path / "b")  # the same node, its state directory lost
    second.append(NOW, "team", "m", 200, 1, 1)
    await UsageRoller(second, store, "n1").roll_once()
    assert sums(store.record) == {("team", "m"): (2, 0, 11, 6)}
    assert store.record is not None and set(store.record.journals) == {first.journal_id, second.journal_id}


async def test_an_unreadable_record_is_never_written_over(tmp_path: Path) -> None:
    (tmp_path / "rolled.json").write_text("{not json")
    j = opened(tmp_path / "j")
    j.append(NOW, "team", "m", 200, 1, 1)
    with pytest.raises(UsageStoreError, match=r"rolled\.json"):
        await UsageRoller(j, FileUsageStore(tmp_path / "rolled.json"), "n1").roll_once()
    assert (tmp_path / "rolled.json").read_text() == "{not json"
    assert j.sealed  # kept for a later roll-up


def test_old_hours_fold_into_totals_and_the_record_stays_under_its_bound() -> None:
    week = 7 * 86400
    adding = {("team", "m", hour_of(NOW - h * 3600)): [1, 0, 100, 10] for h in range(0, 10 * 24)}
    rec = merged(None, "n1", "j", 240, adding, NOW)
    hours = sorted(r.hour for r in rec.rows)
    assert hours[0] == 0 and hours[1] >= hour_of(NOW - week)
    assert sums(rec) == {("team", "m"): (240, 0, 24000, 2400)}  # nothing lost by folding
    small = merged(None, "n1", "j", 240, adding, NOW, max_bytes=2000)
    assert len(encode(small)) <= 2000 and sums(small) == sums(rec)


def test_journal_marks_are_bounded() -> None:
    rec = None
    for i in range(40):
        rec = merged(rec, "n1", f"j{i}", 1, {}, NOW + i)
    assert rec is not None and len(rec.journals) == 16 and "j39" in rec.journals


async def test_a_standalone_agents_usage_is_its_record_plus_the_journal_not_rolled_up(tmp_path: Path) -> None:
    usage_dir = tmp_path / "usage"
    j = opened(usage_dir)
    j.append(NOW, "team", "m", 200, 10, 5)
    await UsageRoller(j, FileUsageStore(usage_dir / "rolled.json"), "solo").roll_once()
    j.append(NOW, "team", "m", 200, 1, 2)  # not rolled up yet
    j.append(NOW, "team", "n", 429, 0, 0)
    rec = local_record(tmp_path, NOW)
    assert sums(rec) == {("team", "m"): (2, 0, 11, 7), ("team", "n"): (1, 1, 0, 0)}


def test_report_sums_nodes_and_filters_by_key_model_and_whole_hours() -> None:
    a = merged(None, "a", "ja", 2, {("k1", "m", hour_of(NOW)): [1, 0, 5, 5], ("k1", "m", 0): [7, 0, 7, 7]}, NOW)
    b = merged(None, "b", "jb", 2, {("k1", "m", hour_of(NOW - 3 * 3600)): [2, 1, 3, 3]}, NOW)
    c = merged(None, "c", "jc", 1, {("k2", "x", hour_of(NOW)): [1, 0, 1, 1]}, NOW)
    everything = report([a, b, c], None, None, None, NOW)
    assert everything.nodes == ["a", "b", "c"]
    assert (everything.total.requests, everything.total.total_tokens) == (11, 32)
    assert [(u.key, u.model, u.requests) for u in everything.usage] == [("k1", "m", 10), ("k2", "x", 1)]
    recent = report([a, b, c], 2 * 3600, "k1", None, NOW)  # the hour 3 h ago and the folded total are out
    assert [(u.key, u.requests, u.prompt_tokens) for u in recent.usage] == [("k1", 1, 5)]
    assert report([a, b, c], 4 * 3600, None, "m", NOW).total.requests == 3


def test_a_stream_is_billed_when_its_end_event_is_in_hand_not_before() -> None:
    """StreamUsage calls on_end with the usage before the [DONE] chunk goes on, once; a model's
    text that says "data: [DONE]" is JSON-escaped inside an event and ends nothing."""
    seen: list[Usage | None] = []
    s = StreamUsage(hide_usage_event=True, on_end=seen.append)
    text = b'data: {"choices":[{"delta":{"content":"\\ndata: [DONE]\\n"}}]}\n\n'
    assert s.feed(text) == text and seen == []
    usage_event = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    assert s.feed(usage_event) == b"" and seen == []  # hidden: asked for on the client's behalf
    assert s.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert seen == [Usage(prompt_tokens=3, completion_tokens=4)]
    s.feed(b"data: [DONE]\n\n")
    assert len(seen) == 1
    assert ends_stream(b"event: message_stop\ndata: {}\n\n") and not ends_stream(b'data: {"x":"[DONE]"}\n\n')
