"""README's first command, as a new user runs it: the demo builds end to end over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import webdataset as wds

from storage import catalog
from storage.root import DatasetRoot

pytestmark = pytest.mark.slow


def test_demo_builds_everything_and_reruns_as_nothing_new(tmp_path, cli_env):
    root = tmp_path / "demo-root"
    cmd = [sys.executable, "-m", "rs5m.cli", "demo", "--root", str(root), "--quiet"]
    first = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr

    dataset = DatasetRoot(root)
    stats = {r["source"]: r for r in json.loads((root / "stats" / "stats.json").read_text())}
    total = stats["total"]
    assert set(stats) == {"laion2b", "coyo700m", "total"}
    with catalog.connect(dataset) as con:
        failed_downloads = con.execute(
            "SELECT count(*) FROM ledger WHERE stage = 'download'"
        ).fetchall()[0][0]
        reasons = dict(
            con.execute("SELECT reason, count(*) FROM ledger GROUP BY reason").fetchall()
        )
    # the table adds up, and every planted failure landed in the ledger with its reason
    assert total["after_keyword_filter"] == total["downloaded"] + failed_downloads
    assert total["remain"] == (
        total["downloaded"]
        - total["invalid_removed"]
        - total["duplicates_removed"]
        - total["outliers_removed"]
    )
    assert total["amount"] > total["after_keyword_filter"]  # false friends and non-RS dropped
    for reason in (
        "http_4xx",
        "http_5xx",
        "not_image",
        "truncated",
        "too_small",
        "too_many_pixels",
    ):
        assert reasons.get(reason) == 1, reasons
    assert reasons.get("duplicate_phash", 0) + reasons.get("duplicate_embedding", 0) >= 4

    # the shards hold exactly the remaining samples, readable by webdataset
    tars = sorted(str(p) for p in (root / "shards").glob("pub11-*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == total["remain"]
    assert all(("jpg" in s or "png" in s or "webp" in s) and "txt" in s for s in samples)
    assert (root / "stats" / "locations.png").stat().st_size > 0

    verify = subprocess.run(
        [sys.executable, "-m", "rs5m.cli", "verify", "--root", str(root)],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert verify.returncode == 0, verify.stdout

    again = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "Nothing new" in again.stdout
