"""Download (img2dataset over loopback HTTP) and validate, end to end, with resume and retry.

A loopback server started here serves the bundled demo images, broken images written by
``rs5m.image_server.write_problem_images`` and routes that fail (404, 500, slow, redirect loop,
HTML as image, ...). Every candidate must end up downloaded-and-valid or in the ledger with the
right reason, and the counts must add up exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from rs5m.image_server import ImageServer, write_problem_images
from schemas.download_config import DownloadConfig, ValidateConfig
from schemas.tables import DOWNLOAD, VALIDATE, sample_uid
from storage.root import DatasetRoot
from storage.stage import Partition, run_partition
from tasks.download import DownloadStage, classify_error, retry_failed
from tasks.download_worker import SafetyPolicy, precheck_url, safe_download_image, set_policy
from tasks.validate import ValidateStage

TEST_DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(TEST_DATA))
from download_helpers import CandidatesStub  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "rs5m" / "demo_data" / "images"
SOURCE, PARTITION = "web", "part-0000"
PART = Partition(SOURCE, PARTITION)

CFG = {
    "allow_hosts": ["127.0.0.1"],
    "timeout": 1.0,
    "total_timeout": 5.0,
    "number_sample_per_shard": 4,
    "processes_count": 1,
    "thread_count": 4,
    "max_bytes": 1_000_000,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("www")
    shutil.copytree(DEMO / "eurosat", folder / "eurosat")
    shutil.copytree(DEMO / "photos", folder / "photos")
    problems = write_problem_images(folder / "problems")
    with ImageServer(folder) as srv:
        yield srv, folder, problems


def url_plan(srv: ImageServer, folder: Path, problems: dict) -> list[tuple[str, str, str | None]]:
    """``(url, outcome, reason)``: outcome is valid, normalized, download (failed with class
    ``reason``) or validate (removed with ``reason``)."""
    plan: list[tuple[str, str, str | None]] = []
    tiles = sorted((folder / "eurosat").glob("*.jpg"))[:16]
    photos = sorted((folder / "photos").glob("*.jpg"))
    plan += [(srv.url(f"eurosat/{p.name}"), "valid", None) for p in tiles]
    plan += [(srv.url(f"photos/{p.name}"), "valid", None) for p in photos]
    for name, expected in problems.items():
        if expected in ("valid", "normalized"):
            plan.append((srv.url(f"problems/{name}"), expected, None))
        else:
            plan.append((srv.url(f"problems/{name}"), "validate", expected))
    plan += [
        (srv.special("404"), "download", "http_4xx"),
        (srv.url("no/such/file.jpg"), "download", "http_4xx"),
        (srv.special("500"), "download", "http_5xx"),
        (srv.special("redirect-loop"), "download", "redirect_loop"),
        (srv.special("html-as-image"), "download", "not_image"),
        (srv.special("close"), "download", "connection"),
        (srv.special("big", n=3_000_000), "download", "too_large"),
        (srv.special("big", n=3_000_000, length=0), "download", "too_large"),
        (srv.special("redirect", to=f"/files/eurosat/{tiles[0].name}"), "valid", None),
        ("http://10.1.2.3/a.jpg", "download", "refused_address"),
        ("http://169.254.169.254/latest/meta-data/", "download", "refused_address"),
        ("http://[::1]/x.jpg", "download", "refused_address"),
        ("file:///etc/passwd", "download", "bad_url"),
        ("not a url", "download", "bad_url"),
    ]
    # Slow responses spread over several shards (they also make the SIGKILL test's run long).
    for i in range(4):
        plan.insert(6 + i * 7, (srv.special("slow", s=2.5, i=i), "download", "timeout"))
    return plan


def run_pipeline(root: DatasetRoot, urls: list[str], cfg: dict) -> None:
    out = run_partition(root, CandidatesStub(SOURCE, PARTITION, urls), PART)
    assert out.status in ("done", "skipped"), out.error
    out = run_partition(root, DownloadStage(DownloadConfig(**cfg)), PART)
    assert out.status in ("done", "skipped"), out.error
    out = run_partition(root, ValidateStage(ValidateConfig()), PART)
    assert out.status in ("done", "skipped"), out.error


def uid_of(url: str, i: int) -> int:
    return sample_uid(SOURCE, url, f"caption {i}")


@pytest.fixture(scope="module")
def pipeline(served, tmp_path_factory):
    srv, folder, problems = served
    plan = url_plan(srv, folder, problems)
    root = DatasetRoot(tmp_path_factory.mktemp("root"))
    run_pipeline(root, [u for u, _, _ in plan], CFG)
    return root, plan


def read(root: DatasetRoot, kind: str, stage: str) -> list[dict]:
    path = (root.output_path if kind == "output" else root.ledger_path)(stage, SOURCE, PARTITION)
    return root.read_table(path).to_pylist()


def test_every_candidate_is_accounted_for(pipeline):
    root, plan = pipeline
    downloads = read(root, "output", DOWNLOAD)
    dl_ledger = read(root, "ledger", DOWNLOAD)
    valid = read(root, "output", VALIDATE)
    val_ledger = read(root, "ledger", VALIDATE)

    candidates = {uid_of(u, i) for i, (u, _, _) in enumerate(plan)}
    downloaded = {r["uid"] for r in downloads if r["status"] == "success"}
    failed = {r["uid"] for r in dl_ledger}
    assert {r["uid"] for r in downloads} == candidates
    assert downloaded.isdisjoint(failed) and downloaded | failed == candidates
    assert len(candidates) == len(downloaded) + len(failed)  # after_keyword_filter
    kept = {r["uid"] for r in valid}
    invalid = {r["uid"] for r in val_ledger}
    assert kept.isdisjoint(invalid) and kept | invalid == downloaded
    assert len(downloaded) == len(kept) + len(invalid)

    # and the marker counts agree with the files
    marker = root.read_json(root.marker_path(DOWNLOAD, SOURCE, PARTITION))
    assert marker["counts"]["downloaded"] == len(downloaded)
    assert marker["counts"]["removed"] == len(failed)


def test_each_candidate_has_the_right_outcome(pipeline):
    root, plan = pipeline
    downloads = {r["uid"]: r for r in read(root, "output", DOWNLOAD)}
    dl_ledger = {r["uid"]: r for r in read(root, "ledger", DOWNLOAD)}
    valid = {r["uid"]: r for r in read(root, "output", VALIDATE)}
    val_ledger = {r["uid"]: r for r in read(root, "ledger", VALIDATE)}
    for i, (url, outcome, reason) in enumerate(plan):
        uid = uid_of(url, i)
        got = (
            ("download", dl_ledger[uid]["reason"])
            if uid in dl_ledger
            else ("validate", val_ledger[uid]["reason"])
            if uid in val_ledger
            else ("normalized" if valid[uid]["normalized"] else "valid", None)
        )
        assert got == (outcome, reason), (url, downloads[uid])
        if uid in dl_ledger:
            assert downloads[uid]["error_class"] == reason
            detail = json.loads(dl_ledger[uid]["detail"])
            assert detail["url"] == url and detail["error"]
            assert dl_ledger[uid]["stage"] == DOWNLOAD and dl_ledger[uid]["source"] == SOURCE


def test_download_rows_point_at_the_original_bytes(pipeline, served):
    root, plan = pipeline
    _, folder, _ = served
    downloads = {r["uid"]: r for r in read(root, "output", DOWNLOAD)}
    tar_cache: dict[str, dict[str, bytes]] = {}
    checked = 0
    for i, (url, outcome, _) in enumerate(plan):
        row = downloads[uid_of(url, i)]
        if row["status"] != "success" or "/files/" not in url:
            continue
        if row["tar"] not in tar_cache:
            with tarfile.open(root.join(row["tar"])) as tar:
                tar_cache[row["tar"]] = {
                    m.name.split(".")[0]: tar.extractfile(m).read()
                    for m in tar.getmembers()
                    if not m.name.endswith((".json", ".txt"))
                }
        stored = tar_cache[row["tar"]][row["key"]]
        original = (folder / url.split("/files/", 1)[1]).read_bytes()
        assert stored == original  # kept un-re-encoded by default
        assert row["sha256"] == hashlib.sha256(original).hexdigest()
        assert row["bytes"] == len(original)
        assert row["tar"].startswith(f"stages/download/{SOURCE}/{PARTITION}/")
        checked += 1
        if original and outcome == "valid":
            with Image.open(io.BytesIO(original)) as im:
                assert (row["width"], row["height"]) == im.size
    assert checked > 20


def test_validated_images_are_normalised_and_readable(pipeline):
    root, plan = pipeline
    valid = {r["uid"]: r for r in read(root, "output", VALIDATE)}
    by_name = {u.rsplit("/", 1)[-1]: uid_of(u, i) for i, (u, _, _) in enumerate(plan)}
    for row in valid.values():
        with tarfile.open(root.join(row["tar"])) as tar:
            data = tar.extractfile(row["member"]).read()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.mode == row["mode"] and im.mode in ("RGB", "L")
            assert im.size == (row["width"], row["height"])
            assert im.getexif().get(0x0112, 1) == 1
    rotated = valid[by_name["exif_rotated.jpg"]]
    assert rotated["normalized"] == "exif_transpose"
    assert rotated["height"] > rotated["width"]  # served wide, tagged "rotate 90"
    assert valid[by_name["cmyk.jpg"]]["original_mode"] == "CMYK"
    assert valid[by_name["cmyk.jpg"]]["format"] == "jpg"
    assert valid[by_name["grey16.png"]]["normalized"] == "16bit"
    assert valid[by_name["palette.png"]]["normalized"].startswith("palette")
    assert valid[by_name["alpha.png"]]["normalized"] == "alpha"
    assert (
        valid[by_name["grey.jpg"]]["mode"] == "L"
        and valid[by_name["grey.jpg"]]["normalized"] is None
    )
    assert valid[by_name["grey.jpg"]]["tar"].startswith("stages/download/")


def test_rerun_is_skipped(pipeline, served):
    root, _ = pipeline
    srv = served[0]
    before = srv.requests
    out = run_partition(root, DownloadStage(DownloadConfig(**CFG)), PART)
    assert out.status == "skipped"
    assert srv.requests == before


def _stats(root: DatasetRoot) -> dict[str, float]:
    side = Path(root.side_dir(DOWNLOAD, SOURCE, PARTITION))
    return {p.name: p.stat().st_mtime_ns for p in side.glob("*_stats.json")}


def test_sigkill_resumes_to_the_same_result(pipeline, tmp_path):
    ref_root, plan = pipeline
    urls = [u for u, _, _ in plan]
    root = DatasetRoot(tmp_path / "root")
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps({"source": SOURCE, "partition": PARTITION, "urls": urls, "download": CFG})
    )
    script = TEST_DATA / "download_run_partition.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root.path), str(job)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: img2dataset's children die with it
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(_stats(root)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the download finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done_at_kill = _stats(root)
    plan_file = Path(root.side_dir(DOWNLOAD, SOURCE, PARTITION)) / "_plan" / "plan.json"
    n_shards = -(-json.loads(plan_file.read_text())["urls"] // CFG["number_sample_per_shard"])
    assert 2 <= len(done_at_kill) < n_shards
    assert not root.exists(root.marker_path(DOWNLOAD, SOURCE, PARTITION))
    time.sleep(0.5)  # let anything that survived show itself by writing

    run_pipeline(root, urls, CFG)
    after = _stats(root)
    assert len(after) == n_shards
    for name, mtime in done_at_kill.items():
        assert after[name] == mtime, f"shard {name} was fetched again"

    def key(rows):
        return sorted((r["uid"], r.get("status"), r.get("error_class"), r["sha256"]) for r in rows)

    for stage in (DOWNLOAD, VALIDATE):
        assert key(read(root, "output", stage)) == key(read(ref_root, "output", stage))
        assert sorted((r["uid"], r["reason"]) for r in read(root, "ledger", stage)) == sorted(
            (r["uid"], r["reason"]) for r in read(ref_root, "ledger", stage)
        )


def test_retry_failed_refetches_only_transient_failures(served, tmp_path):
    srv, _, _ = served
    flaky = srv.special("flaky", id=time.monotonic_ns(), fail=1, file="eurosat/River_1.jpg")
    gone = srv.special("404")
    fine = srv.url("eurosat/Forest_1.jpg")
    urls = [flaky, gone, fine]
    root = DatasetRoot(tmp_path / "root")
    run_pipeline(root, urls, CFG)
    rows = {r["uid"]: r for r in read(root, "output", DOWNLOAD)}
    assert rows[uid_of(flaky, 0)]["error_class"] == "http_5xx"
    assert rows[uid_of(gone, 1)]["error_class"] == "http_4xx"
    hits_404, hits_ok = srv.hits(gone), srv.hits(fine)
    valid_before = root.read_json(root.marker_path(VALIDATE, SOURCE, PARTITION))["output_digest"]

    out = retry_failed(root, PART, DownloadConfig(**CFG))
    assert out.status == "done", out.error
    rows = {r["uid"]: r for r in read(root, "output", DOWNLOAD)}
    assert rows[uid_of(flaky, 0)]["status"] == "success"
    assert rows[uid_of(flaky, 0)]["tar"].startswith(
        f"stages/download/{SOURCE}/{PARTITION}/retry-001/"
    )
    assert rows[uid_of(gone, 1)]["error_class"] == "http_4xx"
    assert srv.hits(gone) == hits_404 and srv.hits(fine) == hits_ok  # not refetched
    assert {r["uid"] for r in read(root, "ledger", DOWNLOAD)} == {uid_of(gone, 1)}

    # a normal run afterwards keeps the merged result; validate picks up the new image
    assert run_partition(root, DownloadStage(DownloadConfig(**CFG)), PART).status == "skipped"
    assert run_partition(root, ValidateStage(ValidateConfig()), PART).status == "done"
    valid = read(root, "output", VALIDATE)
    assert uid_of(flaky, 0) in {r["uid"] for r in valid}
    assert root.read_json(root.marker_path(VALIDATE, SOURCE, PARTITION))["output_digest"] != (
        valid_before
    )
    # nothing transient left: nothing to do
    assert retry_failed(root, PART, DownloadConfig(**CFG)).status == "skipped"


def test_private_addresses_are_refused_by_default(served, tmp_path):
    srv, _, _ = served
    urls = [srv.url("eurosat/Forest_1.jpg"), "http://localhost/x.jpg", "http://[fd00:ec2::254]/"]
    root = DatasetRoot(tmp_path / "root")
    before = srv.requests
    assert run_partition(root, CandidatesStub(SOURCE, PARTITION, urls), PART).status == "done"
    assert run_partition(root, DownloadStage(DownloadConfig()), PART).status == "done"
    assert srv.requests == before  # nothing was fetched
    reasons = {r["reason"] for r in read(root, "ledger", DOWNLOAD)}
    assert reasons == {"refused_address"}
    assert len(read(root, "ledger", DOWNLOAD)) == 3


def test_connections_are_checked_where_they_land(served):
    """Redirects and DNS answers are checked at connect time, not only before the download."""
    srv, _, _ = served
    try:
        set_policy(SafetyPolicy())  # nothing private allowed
        _, stream, err = safe_download_image((0, srv.url("eurosat/Forest_1.jpg")), 2, None, None)
        assert stream is None and classify_error(err) == "refused_address"
        # allowed by name, redirected to an address that is not allowed
        set_policy(SafetyPolicy(allow_hosts=("localhost",)))
        target = f"http://127.0.0.1:{srv.port}/files/eurosat/Forest_1.jpg"
        url = f"http://localhost:{srv.port}/special/redirect?to={target}"
        _, stream, err = safe_download_image((0, url), 2, None, None)
        assert stream is None and classify_error(err) == "refused_address", err
        set_policy(SafetyPolicy(allow_hosts=("127.0.0.0/8",), max_bytes=1000))
        _, stream, err = safe_download_image(
            (0, srv.special("big", n=5000, length=0)), 2, None, None
        )
        assert classify_error(err) == "too_large"
        _, stream, err = safe_download_image((0, "file:///etc/hostname"), 2, None, None)
        assert classify_error(err) == "bad_url"
    finally:
        set_policy(SafetyPolicy())


@pytest.mark.parametrize(
    ("url", "allow", "expected"),
    [
        ("http://127.0.0.1/a.jpg", (), "refused_address"),
        ("http://127.0.0.1/a.jpg", ("127.0.0.1",), None),
        ("http://10.0.0.7/a.jpg", ("10.0.0.0/8",), None),
        ("http://192.168.1.1/a.jpg", ("127.0.0.1",), "refused_address"),
        ("http://169.254.169.254/", (), "refused_address"),
        ("http://[fd00:ec2::254]/", (), "refused_address"),
        ("http://[::ffff:127.0.0.1]/", (), "refused_address"),
        ("http://224.0.0.1/", (), "refused_address"),
        ("http://0.0.0.0/", (), "refused_address"),
        ("http://8.8.8.8/a.jpg", (), None),
        ("ftp://8.8.8.8/a.jpg", (), "bad_url"),
        ("data:image/png;base64,AAAA", (), "bad_url"),
        ("", (), "bad_url"),
    ],
)
def test_precheck(url, allow, expected):
    verdict = precheck_url(url, SafetyPolicy(allow_hosts=allow))
    assert (verdict[0] if verdict else None) == expected


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("HTTP Error 404: Not Found", "http_4xx"),
        ("HTTP Error 403: Forbidden", "http_4xx"),
        ("HTTP Error 503: Service Unavailable", "http_5xx"),
        ("<urlopen error [Errno -2] Name or service not known>", "dns"),
        ("<urlopen error [Errno -3] Temporary failure in name resolution>", "dns"),
        ("<urlopen error timed out>", "timeout"),
        ("The read operation timed out", "timeout"),
        ("<urlopen error [Errno 111] Connection refused>", "connection"),
        ("Remote end closed connection without response", "connection"),
        ("[Errno 104] Connection reset by peer", "connection"),
        (
            "HTTP Error 302: The HTTP server returned a redirect error that would lead to an "
            "infinite loop.",
            "redirect_loop",
        ),
        ("<urlopen error refused_address: a connected to 10.0.0.1>", "refused_address"),
        ("too_large: body over 10 bytes", "too_large"),
        ("Use of image disallowed by X-Robots-Tag directive", "disallowed"),
        ("Image decoding error", "not_image"),
        ("image too small", "too_small"),
        ("something new", "other"),
        (None, "other"),
    ],
)
def test_classify_error(message, expected):
    assert classify_error(message) == expected


def test_reencoding_mode_uses_img2dataset_resizer(served, tmp_path):
    srv, folder, _ = served
    photo = sorted((folder / "photos").glob("*.jpg"))[0]
    urls = [srv.url(f"photos/{photo.name}"), srv.special("html-as-image")]
    cfg = {
        **CFG,
        "keep_original_bytes": False,
        "image_size": 64,
        "encode_format": "png",
        "encode_quality": 6,
    }
    root = DatasetRoot(tmp_path / "root")
    out = run_partition(root, CandidatesStub(SOURCE, PARTITION, urls), PART)
    assert out.status in ("done", "skipped"), out.error
    out = run_partition(root, DownloadStage(DownloadConfig(**cfg)), PART)
    assert out.status == "done", out.error
    rows = {r["uid"]: r for r in read(root, "output", DOWNLOAD)}
    ok = rows[uid_of(urls[0], 0)]
    assert ok["status"] == "success" and min(ok["width"], ok["height"]) == 64
    with tarfile.open(root.join(ok["tar"])) as tar:
        data = tar.extractfile(f"{ok['key']}.png").read()
    assert data.startswith(b"\x89PNG") and hashlib.sha256(data).hexdigest() == ok["sha256"]
    assert rows[uid_of(urls[1], 1)]["error_class"] == "not_image"
    assert pq.read_metadata(root.output_path(DOWNLOAD, SOURCE, PARTITION)).num_rows == 2
