"""Dataset root, fingerprints, atomic commit, ledger, lock and catalog."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from storage import catalog
from storage.fingerprint import fingerprint
from storage.lock import RootLocked, build_lock
from storage.root import DatasetRoot
from storage.stage import Partition, Stage, StageContext, StageResult, run_partition


class Numbers(Stage):
    """A first stage: reads a raw text file of integers, keeps the even ones."""

    name = "numbers"
    version = "1"

    def __init__(self, modulus: int = 2):
        self.modulus = modulus
        self.calls = 0

    def params(self):
        return {"modulus": self.modulus}

    def run(self, ctx: StageContext) -> StageResult:
        self.calls += 1
        values = [int(x) for x in Path(ctx.partition.raw_input).read_text().split()]
        keep = [v for v in values if v % self.modulus == 0]
        drop = [v for v in values if v % self.modulus]
        return StageResult(
            output=pa.table({"uid": pa.array(keep, pa.uint64())}),
            removed=pa.table({"uid": pa.array(drop, pa.uint64()), "reason": ["odd"] * len(drop)}),
            counts={"rows_in": len(values)},
        )


class Doubler(Stage):
    name = "doubler"
    version = "1"
    inputs = ("numbers",)

    def __init__(self):
        self.calls = 0

    def run(self, ctx: StageContext) -> StageResult:
        self.calls += 1
        t = ctx.read_input("numbers")
        return StageResult(output=t.append_column("double", pa.compute.multiply(t["uid"], 2)))


@pytest.fixture
def raw(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("1 2 3 4 5 6")
    return path


def test_fingerprint_changes_with_every_part():
    base = fingerprint("s", "1", {"a": 1}, {"raw": "x"})
    assert base == fingerprint("s", "1", {"a": 1}, {"raw": "x"})
    assert base != fingerprint("t", "1", {"a": 1}, {"raw": "x"})
    assert base != fingerprint("s", "2", {"a": 1}, {"raw": "x"})
    assert base != fingerprint("s", "1", {"a": 2}, {"raw": "x"})
    assert base != fingerprint("s", "1", {"a": 1}, {"raw": "y"})


def test_commit_skip_and_rerun_on_param_change(tmp_path, raw):
    root = DatasetRoot(tmp_path / "root")
    part = Partition("src", "p0", str(raw))
    stage = Numbers()
    assert run_partition(root, stage, part).status == "done"
    assert run_partition(root, stage, part).status == "skipped"
    assert stage.calls == 1
    out = root.read_table(root.output_path("numbers", "src", "p0"))
    assert out["uid"].to_pylist() == [2, 4, 6]
    ledger = root.read_table(root.ledger_path("numbers", "src", "p0"))
    assert ledger["uid"].to_pylist() == [1, 3, 5]
    assert set(ledger["stage"].to_pylist()) == {"numbers"}
    assert set(ledger["source"].to_pylist()) == {"src"}
    marker = root.read_json(root.marker_path("numbers", "src", "p0"))
    assert marker["counts"] == {"rows_out": 3, "removed": 3, "rows_in": 6}

    assert run_partition(root, Numbers(modulus=3), part).status == "done"
    assert root.read_table(root.output_path("numbers", "src", "p0"))["uid"].to_pylist() == [3, 6]


def test_downstream_reruns_only_when_upstream_content_changes(tmp_path, raw):
    root = DatasetRoot(tmp_path / "root")
    part = Partition("src", "p0", str(raw))
    run_partition(root, Numbers(), part)
    doubler = Doubler()
    assert run_partition(root, doubler, part).status == "done"
    # the raw file changes but the kept rows do not: downstream stays current
    raw.write_text("1 2 3 4 5 6 7")
    assert run_partition(root, Numbers(), part).status == "done"
    assert run_partition(root, doubler, part).status == "skipped"
    raw.write_text("2 4 8")
    run_partition(root, Numbers(), part)
    assert run_partition(root, doubler, part).status == "done"
    assert doubler.calls == 2


def test_pending_when_upstream_missing(tmp_path, raw):
    root = DatasetRoot(tmp_path / "root")
    outcome = run_partition(root, Doubler(), Partition("src", "p0", None))
    assert outcome.status == "pending"


def test_stage_error_is_recorded_and_cleared(tmp_path):
    root = DatasetRoot(tmp_path / "root")
    bad = tmp_path / "bad.txt"
    bad.write_text("1 two 3")
    part = Partition("src", "bad", str(bad))
    outcome = run_partition(root, Numbers(), part)
    assert outcome.status == "failed"
    assert "two" in outcome.error
    failure = root.read_json(root.failure_path("numbers", "src", "bad"))
    assert "ValueError" in failure["error"]
    assert not root.exists(root.marker_path("numbers", "src", "bad"))
    bad.write_text("1 2 3")
    assert run_partition(root, Numbers(), part).status == "done"
    assert not root.exists(root.failure_path("numbers", "src", "bad"))


def test_missing_raw_input_fails_cleanly(tmp_path):
    root = DatasetRoot(tmp_path / "root")
    outcome = run_partition(root, Numbers(), Partition("src", "gone", str(tmp_path / "gone.txt")))
    assert outcome.status == "failed"
    assert "gone.txt" in outcome.error


def test_killed_commit_leaves_no_marker_and_is_redone(tmp_path, raw, monkeypatch):
    root = DatasetRoot(tmp_path / "root")
    part = Partition("src", "p0", str(raw))

    class Killed(BaseException):
        pass

    real_write_json = DatasetRoot.write_json

    def dying_write_json(self, path, obj):
        if path.endswith(".done.json"):
            raise Killed()  # the process dies after the data, before the marker
        return real_write_json(self, path, obj)

    monkeypatch.setattr(DatasetRoot, "write_json", dying_write_json)
    with pytest.raises(Killed):
        run_partition(root, Numbers(), part)
    monkeypatch.undo()
    assert root.exists(root.output_path("numbers", "src", "p0"))
    assert not root.exists(root.marker_path("numbers", "src", "p0"))
    stage = Numbers()
    assert run_partition(root, stage, part).status == "done"
    assert stage.calls == 1


def test_torn_temporary_files_are_ignored_and_cleaned(tmp_path, raw):
    root = DatasetRoot(tmp_path / "root")
    part = Partition("src", "p0", str(raw))
    stage_dir = root.stage_dir("numbers", "src")
    os.makedirs(stage_dir)
    torn = os.path.join(stage_dir, "p0.parquet.tmp-deadbeef0000")
    with open(torn, "wb") as f:
        f.write(b"PAR1 half a file")
    run_partition(root, Numbers(), part)
    assert not os.path.exists(torn)
    with catalog.connect(root) as con:
        assert con.execute("SELECT count(*) FROM numbers").fetchone()[0] == 3


def _hold_lock(root_path: str, ready, release) -> None:
    with build_lock(DatasetRoot(root_path)):
        ready.set()
        release.wait(20)


def test_lock_refuses_a_second_build_with_a_clear_message(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with (
            pytest.raises(RootLocked, match=f"pid {holder.pid}"),
            build_lock(DatasetRoot(tmp_path)),
        ):
            pass
    finally:
        release.set()
        holder.join(30)
    with build_lock(DatasetRoot(tmp_path), wait=5):
        pass


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    assert ready.wait(60)
    holder.kill()
    holder.join(30)
    start = time.monotonic()
    with build_lock(DatasetRoot(tmp_path), wait=5):
        pass
    assert time.monotonic() - start < 5


def test_catalog_is_rebuilt_from_files(tmp_path, raw):
    root = DatasetRoot(tmp_path / "root")
    run_partition(root, Numbers(), Partition("src", "p0", str(raw)))
    with catalog.connect(root) as con:
        assert con.execute("SELECT count(*) FROM ledger").fetchone()[0] == 3
    os.remove(root.join("catalog.duckdb"))
    with catalog.connect(root) as con:
        assert con.execute("SELECT sum(uid) FROM numbers").fetchone()[0] == 12
        row = con.execute("SELECT stage, source, partition FROM markers").fetchone()
        assert row == ("numbers", "src", "p0")
    assert os.path.exists(root.join("catalog.duckdb"))


def test_root_on_another_fsspec_filesystem(raw):
    root = DatasetRoot(f"memory://rs5m-test-{os.getpid()}")
    assert not root.is_local
    part = Partition("src", "p0", str(raw))
    assert run_partition(root, Numbers(), part).status == "done"
    assert run_partition(root, Numbers(), part).status == "skipped"
    marker = root.read_json(root.marker_path("numbers", "src", "p0"))
    assert json.dumps(marker)
    with catalog.connect(root) as con:
        assert con.execute("SELECT count(*) FROM numbers").fetchone()[0] == 3
