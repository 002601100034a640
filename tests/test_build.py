"""The build flow end to end through Prefect: incremental reruns, bad input, stats, SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rs5m.cli import format_rows
from schemas.config import load_config
from storage import catalog
from storage.root import DatasetRoot

pytestmark = pytest.mark.slow

RS_CAPTIONS = [
    "aerial view of a river delta",
    "satellite image of farmland in spring",
    "Sentinel-2 scene over the Alps",
    "drone photo of a harbour from above",
]
OTHER = ["a dog on the beach", "wedding cake with roses", "satellite dish on a roof"]


def _laion(path: Path, n: int, seed: int) -> None:
    captions = [(RS_CAPTIONS + OTHER)[(i + seed) % 7] + f" #{seed}-{i}" for i in range(n)]
    pq.write_table(
        pa.table(
            {
                "URL": [f"http://127.0.0.1:9/{seed}/{i}.jpg" for i in range(n)],
                "TEXT": captions,
                "WIDTH": [256] * n,
                "HEIGHT": [256] * n,
                "similarity": [0.3] * n,
            }
        ),
        path,
    )


def _config(tmp_path: Path, vocabulary: str | None = None) -> Path:
    cfg = tmp_path / "build.toml"
    vocab = f'vocabulary = "{vocabulary}"\n' if vocabulary else ""
    cfg.write_text(
        '[[sources]]\nname = "laion2b"\nformat = "laion2b"\npaths = ["meta/*.parquet"]\n\n'
        f'[keyword_filter]\n{vocab}\n[run]\nstages = ["keyword_filter"]\nworkers = 2\n'
    )
    return cfg


def _build(cfg_path: Path, root: Path) -> dict:
    from flows.build import build_flow

    cfg = load_config(cfg_path)
    return build_flow(
        config=cfg.model_dump(mode="json", by_alias=True), root=str(root), show_progress=False
    )


def test_incremental_build_through_prefect(tmp_path, prefect_server):
    (tmp_path / "meta").mkdir()
    for i in range(3):
        _laion(tmp_path / "meta" / f"part-{i:05d}.parquet", 70, seed=i)
    root = tmp_path / "root"
    cfg = _config(tmp_path)

    first = _build(cfg, root)
    assert first["stages"]["keyword_filter"]["done"] == 3
    stats = {r["source"]: r for r in first["statistics"]}
    assert stats["laion2b"]["amount"] == 210
    after = stats["laion2b"]["after_keyword_filter"]
    assert 0 < after < 210
    assert stats["laion2b"]["downloaded"] is None  # the stage did not run: empty, not zero
    with catalog.connect(DatasetRoot(root)) as con:
        assert con.execute("SELECT count(*) FROM keyword_filter").fetchone()[0] == after

    # nothing new: no stage work
    again = _build(cfg, root)
    assert again["processed_partitions"] == 0
    assert again["stages"]["keyword_filter"] == {"done": 0, "skipped": 3, "failed": 0, "pending": 0}

    # a new metadata file is processed alone
    _laion(tmp_path / "meta" / "part-00003.parquet", 70, seed=3)
    more = _build(cfg, root)
    assert more["stages"]["keyword_filter"]["done"] == 1
    assert more["stages"]["keyword_filter"]["skipped"] == 3

    # a changed keyword list reruns exactly the keyword stage, on every partition
    vocab = tmp_path / "vocab.toml"
    vocab.write_text('version = "test-1"\n[terms.view]\n"aerial" = ["aerial"]\n')
    changed = _build(_config(tmp_path, vocabulary=str(vocab)), root)
    assert changed["stages"]["keyword_filter"]["done"] == 4
    narrowed = {r["source"]: r for r in changed["statistics"]}["laion2b"]
    assert narrowed["amount"] == 280
    assert 0 < narrowed["after_keyword_filter"] < more["statistics"][0]["after_keyword_filter"]

    # the build published its table as a Prefect artifact
    from prefect.artifacts import Artifact

    artifact = Artifact.get("rs5m-build-stats")
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert {r["source"] for r in data} == {"laion2b", "total"}


def test_bad_inputs_fail_their_partition_only(tmp_path, prefect_server):
    meta = tmp_path / "meta"
    meta.mkdir()
    _laion(meta / "good.parquet", 50, seed=1)
    (meta / "empty.parquet").write_bytes(b"")
    (meta / "notparquet.parquet").write_text("URL,TEXT\nhttp://x,aerial view\n")
    pq.write_table(
        pa.table({"URL": ["http://a"], "CAPTION": ["aerial view"]}), meta / "nocap.parquet"
    )
    pq.write_table(pa.table({"URL": ["http://a"], "TEXT": [3]}), meta / "wrongtype.parquet")
    good_bytes = (meta / "good.parquet").read_bytes()
    (meta / "truncated.parquet").write_bytes(good_bytes[: len(good_bytes) // 2])
    bad_utf8 = pa.array([b"aerial \xff view"], pa.binary()).cast(pa.string(), safe=False)
    pq.write_table(pa.table({"URL": ["http://a"], "TEXT": bad_utf8}), meta / "badutf8.parquet")
    pq.write_table(
        pa.table(
            {
                "URL": ["http://a/1", "http://a/2", "http://a/3", "http://a/4"],
                "TEXT": [None, "", "aerial view " + "x" * 10_000_000, "aerial view of a port"],
            }
        ),
        meta / "oddcaptions.parquet",
    )
    root = tmp_path / "root"
    summary = _build(_config(tmp_path), root)
    kw = summary["stages"]["keyword_filter"]
    assert kw["done"] == 2 and kw["failed"] == 6

    dataset = DatasetRoot(root)
    with catalog.connect(dataset) as con:
        entries = catalog.status(con, dataset)
    (entry,) = entries
    errors = dict(entry.errors)
    assert entry.failed == 6 and entry.done == 2
    assert "nocap.parquet" in errors["nocap"] and "'TEXT'" in errors["nocap"]
    assert "'TEXT'" in errors["wrongtype"] and "VARCHAR" in errors["wrongtype"]
    assert "'TEXT'" in errors["badutf8"] and "UTF8" in errors["badutf8"]
    for name in ("empty", "notparquet", "truncated"):
        assert f"{name}.parquet" in errors[name]

    odd = dataset.read_table(dataset.output_path("keyword_filter", "laion2b", "oddcaptions"))
    assert odd["caption"].to_pylist() == ["aerial view of a port"]
    ledger = dataset.read_table(dataset.ledger_path("keyword_filter", "laion2b", "oddcaptions"))
    assert ledger["reason"].to_pylist() == ["caption_too_long"]

    # fix one file: the next build retries only the failed partitions and fixes that one
    pq.write_table(
        pa.table({"URL": ["http://a"], "TEXT": ["aerial view"]}), meta / "wrongtype.parquet"
    )
    rerun = _build(_config(tmp_path), root)["stages"]["keyword_filter"]
    assert rerun == {"done": 1, "skipped": 2, "failed": 5, "pending": 0}


def _markers_and_outputs(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in sorted((root / "stages").rglob("*.parquet")):
        out[str(path.relative_to(root))] = pq.read_table(path).to_pylist()
    for path in sorted((root / "stages").rglob("*.done.json")):
        marker = json.loads(path.read_text())
        out[str(path.relative_to(root))] = (marker["fingerprint"], marker["output_digest"])
    return out


def test_sigkill_mid_build_then_resume_matches_clean_run(tmp_path, cli_env):
    meta = tmp_path / "meta"
    meta.mkdir()
    for i in range(12):
        _laion(meta / f"part-{i:05d}.parquet", 3000, seed=i)
    cfg = _config(tmp_path)
    rs5m = [sys.executable, "-m", "rs5m.cli", "build", "--config", str(cfg), "--quiet"]

    clean = tmp_path / "clean"
    subprocess.run(
        [*rs5m, "--root", str(clean)], env=cli_env, check=True, timeout=300, capture_output=True
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*rs5m, "--root", str(killed)],
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = list((killed / "stages").rglob("*.done.json")) if killed.exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    partial = list((killed / "stages").rglob("*.done.json"))
    assert 2 <= len(partial) < 12, "the kill should land mid-build"

    resumed = subprocess.run(
        [*rs5m, "--root", str(killed)], env=cli_env, timeout=300, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert _markers_and_outputs(killed) == _markers_and_outputs(clean)
    assert not list(killed.rglob("*.tmp-*"))
    shutil.rmtree(clean)


def test_stats_formats():
    rows = [
        {"source": "a", "amount": 1000, "after_keyword_filter": 10, "downloaded": None},
        {"source": "total", "amount": 1000, "after_keyword_filter": 10, "downloaded": None},
    ]
    cols = ["source", "amount", "after_keyword_filter", "downloaded"]
    table = format_rows(rows, cols, "table")
    assert table.splitlines()[0].split() == cols
    assert "1,000" in table
    assert format_rows(rows, cols, "csv").splitlines()[1] == "a,1000,10,"
    assert json.loads(format_rows(rows, cols, "json"))[0]["downloaded"] is None


def test_retry_failed_refetches_transient_failures_through_the_build(tmp_path, prefect_server):
    from rs5m.demo import IMAGES
    from rs5m.image_server import ImageServer

    meta = tmp_path / "meta"
    meta.mkdir()
    with ImageServer(IMAGES) as srv:
        urls = [
            srv.url("eurosat/Forest_1.jpg"),
            srv.url("eurosat/River_1.jpg"),
            srv.special("flaky", id="retry-test", fail=1, file="eurosat/Pasture_1.jpg"),
            srv.special("404"),
        ]
        pq.write_table(
            pa.table({"URL": urls, "TEXT": [f"aerial view number {i}" for i in range(4)]}),
            meta / "part-0.parquet",
        )
        cfg = tmp_path / "build.toml"
        cfg.write_text(
            '[[sources]]\nname = "laion2b"\nformat = "laion2b"\npaths = ["meta/*.parquet"]\n'
            '[download]\nallow_hosts = ["127.0.0.1"]\nthread_count = 4\ntimeout = 5\n'
            '[run]\nstages = ["keyword_filter", "download", "validate"]\n'
        )
        from flows.build import build_flow

        config = load_config(cfg).model_dump(mode="json", by_alias=True)
        first = build_flow(config=config, root=str(tmp_path / "root"), show_progress=False)
        stats = first["statistics"][0]
        assert (stats["after_keyword_filter"], stats["downloaded"]) == (4, 2)

        plain = build_flow(config=config, root=str(tmp_path / "root"), show_progress=False)
        assert plain["processed_partitions"] == 0  # a plain rebuild does not refetch

        retried = build_flow(
            config=config, root=str(tmp_path / "root"), show_progress=False, retry_failed=True
        )
    stats = retried["statistics"][0]
    assert (stats["after_keyword_filter"], stats["downloaded"]) == (4, 3)  # the 404 stays failed
    assert retried["stages"]["validate"]["done"] == 1  # downstream reran on the changed output
