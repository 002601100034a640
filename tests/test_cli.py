"""The ``rs5m`` command as a user runs it."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rs5m.cli import main
from storage.lock import build_lock
from storage.root import DatasetRoot
from storage.stage import Partition, run_partition
from tasks.keyword_filter import KeywordFilterStage


@pytest.fixture
def built_root(tmp_path):
    meta = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": [f"http://127.0.0.1:9/{i}.jpg" for i in range(6)],
                "TEXT": [
                    "aerial view of a port",
                    "a cat",
                    "satellite image of a city",
                    "dog",
                    "drone shot of a farm from above",
                    "cake",
                ],
            }
        ),
        meta,
    )
    root = DatasetRoot(tmp_path / "root")
    run_partition(root, KeywordFilterStage("laion2b"), Partition("laion2b", "p0", str(meta)))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    run_partition(root, KeywordFilterStage("laion2b"), Partition("laion2b", "p1", str(bad)))
    return root


def test_stats_in_three_formats(built_root, capsys):
    assert main(["stats", "--root", built_root.url, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[0]["source"] == "laion2b" and rows[0]["amount"] == "6"
    assert rows[0]["after_keyword_filter"] == "3"
    assert rows[0]["downloaded"] == ""  # not run: empty, not zero
    assert rows[-1]["source"] == "total"

    assert main(["stats", "--root", built_root.url, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["invalid_removed"] is None and data[0]["remain"] == 3

    assert main(["stats", "--root", built_root.url]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == [
        "source",
        "amount",
        "after_keyword_filter",
        "downloaded",
        "invalid_removed",
        "duplicates_removed",
        "outliers_removed",
        "remain",
    ]


def test_status_lists_failed_partitions(built_root, capsys):
    assert main(["status", "--root", built_root.url]) == 1
    out = capsys.readouterr().out
    assert "keyword_filter" in out
    assert "laion2b/p1" in out and "bad.parquet" in out


def test_second_build_exits_with_the_holder(tmp_path, cli_env):
    cfg = tmp_path / "b.toml"
    cfg.write_text('[run]\nstages = ["keyword_filter"]\n')
    root = tmp_path / "root"
    with build_lock(DatasetRoot(root)):
        proc = subprocess.run(
            [sys.executable, "-m", "rs5m.cli", "build", "--config", str(cfg), "--root", str(root)],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert proc.returncode == 3, proc.stderr
    assert "another build is running" in proc.stderr and "--wait" in proc.stderr
