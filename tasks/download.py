"""Download stage: every candidate of a partition is fetched over HTTP by img2dataset.

Per partition (``stages/download/<source>/<partition>/`` is ``ctx.side_dir``)::

    _plan/plan.json        our plan marker: the partition fingerprint it was made for
    _plan/urls.parquet     uid, url, caption of the candidates handed to img2dataset (in order)
    _plan/refused.parquet  candidates refused before any request (bad URL, DNS, private address)
    00000.tar ...          img2dataset's webdataset shards (the image bytes stay there)
    00000.parquet ...      img2dataset's per-sample results (uid, key, status, error_message)
    00000_stats.json ...   img2dataset's "shard done" files (what its incremental mode skips)
    retry-001/ ...         one folder per ``--retry-failed`` round, with the same layout

Resume: the plan is frozen in ``_plan`` before img2dataset starts; a rerun after a kill finds the
same plan (same fingerprint) and runs img2dataset in ``incremental`` mode on the same URL list,
so completed shards (those with ``*_stats.json``) are not fetched again. A changed plan
(new parameters or new candidates) clears the folder. The partition's ``*.done.json`` marker is
only written by ``storage.stage.run_partition`` after the whole partition is assembled.

Output: one row per candidate (``schemas.tables.DOWNLOADS``); failed candidates also go to the
ledger with ``reason`` = error class and ``detail`` = ``{"url": ..., "error": ...}``, so that
``candidates = downloaded + ledger(download)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import posixpath
import re
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from schemas.download_config import TRANSIENT_ERROR_CLASSES, DownloadConfig
from schemas.tables import DOWNLOAD, DOWNLOADS, KEYWORD_FILTER
from storage.root import DatasetRoot
from storage.stage import (
    Outcome,
    Partition,
    Stage,
    StageContext,
    StageResult,
    dumps_detail,
    partition_fingerprint,
    run_partition,
)
from tasks.download_worker import WORKER_ENV, SafetyPolicy, precheck_url

PLAN_DIR = "_plan"
SHUTDOWN_GRACE_S = 30.0  # after the last shard is written, img2dataset gets this long to exit
OOM_SHARD_COUNT = 5  # shard files are named 00000.tar, 00001.tar, ...
_PROJECT_ROOT = str(Path(__file__).resolve().parents[1])

# -- error classes ---------------------------------------------------------------------------------

_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")
_DNS_HINTS = (
    "name or service not known",
    "temporary failure in name resolution",
    "no address associated",
    "nodename nor servname",
    "getaddrinfo failed",
    "[errno -2]",
    "[errno -3]",
    "[errno -5]",
)
_CONNECTION_HINTS = (
    "connection refused",
    "connection reset",
    "connection aborted",
    "remote end closed",
    "incompleteread",
    "incomplete read",
    "broken pipe",
    "network is unreachable",
    "no route to host",
    "eof occurred",
    "badstatusline",
    "remotedisconnected",
)


def classify_error(message: str | None) -> str:
    """Map an img2dataset ``error_message`` (urllib's text, or our tags) to an error class."""
    if not message:
        return "other"
    low = message.lower()
    for tag in ("refused_address", "too_large", "bad_url"):
        if low.startswith(tag) or f"error {tag}:" in low:
            return tag
    if "infinite loop" in low:
        return "redirect_loop"
    if "x-robots-tag" in low:
        return "disallowed"
    m = _HTTP_STATUS.search(message)
    if m:
        code = int(m.group(1))
        if 400 <= code < 500:
            return "http_4xx"
        if code >= 500:
            return "http_5xx"
        return "other"
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if any(h in low for h in _DNS_HINTS):
        return "dns"
    if any(h in low for h in _CONNECTION_HINTS):
        return "connection"
    if "image decoding error" in low:
        return "not_image"
    if "image too small" in low:
        return "too_small"
    if "image area too large" in low:
        return "too_large"
    if "unknown url type" in low or ("redirection to url" in low and "not allowed" in low):
        return "bad_url"
    return "other"


def is_transient(error_class: str | None) -> bool:
    return error_class in TRANSIENT_ERROR_CLASSES


def sniff_image(data: bytes) -> tuple[bool, int | None, int | None]:
    """``(is_image, width, height)`` from the header only (no decoding). Empty data counts as
    an image here: the validate stage removes it as ``empty``."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return True, None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return True, int(im.width), int(im.height)
    except UnidentifiedImageError:
        return False, None, None
    except Exception:  # a bomb, a broken header: an image, judged by the validate stage
        return True, None, None


# -- the stage -------------------------------------------------------------------------------------


class DownloadStage(Stage):
    """Fetch a partition's candidates with img2dataset (see the module docstring).

    ``retry_failed=True`` is the ``--retry-failed`` mode: the committed output is kept and only
    its failures of a transient class (timeout, http_5xx, connection) are fetched again, in a new
    ``retry-NNN`` round whose results replace theirs. Use :func:`retry_failed` to run it.
    """

    name = DOWNLOAD
    version = "1"
    inputs = (KEYWORD_FILTER,)

    def __init__(self, settings: DownloadConfig | None = None, retry_failed: bool = False):
        self.settings = settings or DownloadConfig()
        self.retry_failed = retry_failed

    def params(self) -> dict[str, Any]:
        # Parallelism does not change the output, so it does not enter the fingerprint.
        return self.settings.model_dump(mode="json", exclude={"processes_count", "thread_count"})

    # -- img2dataset -------------------------------------------------------------------------------
    def img2dataset_kwargs(self, url_list: str, output_folder: str) -> dict[str, Any]:
        """The keyword arguments of ``img2dataset.download`` this stage uses (the bench reuses
        them for its bare img2dataset baseline)."""
        s = self.settings
        return {
            "url_list": url_list,
            "output_folder": output_folder,
            "input_format": "parquet",
            "url_col": "url",
            "caption_col": "caption",
            "save_additional_columns": ["uid"],
            "output_format": "webdataset",
            "incremental_mode": "incremental",
            "number_sample_per_shard": s.number_sample_per_shard,
            "oom_shard_count": OOM_SHARD_COUNT,
            "processes_count": s.processes_count,
            "thread_count": s.thread_count,
            "timeout": s.timeout,
            "retries": s.retries,
            "user_agent_token": s.user_agent_token,
            "disallowed_header_directives": list(s.disallowed_header_directives),
            "disable_all_reencoding": s.keep_original_bytes,
            "image_size": s.image_size,
            "resize_mode": s.resize_mode,
            "resize_only_if_bigger": s.resize_only_if_bigger,
            "encode_format": s.encode_format,
            "encode_quality": s.encode_quality,
            "min_image_size": s.min_image_size,
            "extract_exif": s.extract_exif,
            "compute_hash": None,  # we hash the stored bytes ourselves
            "distributor": "multiprocessing",
            "max_shard_retry": 1,
            "enable_wandb": False,
        }

    def policy(self) -> SafetyPolicy:
        s = self.settings
        return SafetyPolicy(
            allow_hosts=tuple(s.allow_hosts),
            max_bytes=s.max_bytes,
            total_timeout=s.total_timeout,
            max_redirects=s.max_redirects,
        )

    def _run_img2dataset(self, root: DatasetRoot, folder: str, n_urls: int, scratch: Path):
        n_shards = math.ceil(n_urls / self.settings.number_sample_per_shard)
        if n_urls == 0 or _done_shards(root, folder) >= set(range(n_shards)):
            return
        job = {
            "img2dataset": self.img2dataset_kwargs(
                root.query_url(posixpath.join(folder, PLAN_DIR, "urls.parquet")),
                root.query_url(folder),
            ),
            "policy": self.policy().to_json(),
        }
        job_file = scratch / f"job-{os.getpid()}-{abs(hash(folder))}.json"
        job_file.write_text(json.dumps(job))
        log_file = scratch / (job_file.stem + ".log")
        env = dict(os.environ)
        env[WORKER_ENV] = "1"
        env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        env["PYTHONPATH"] = os.pathsep.join(
            [_PROJECT_ROOT, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        )
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tasks.download_worker", str(job_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=scratch,
                env=env,
            )
            try:
                all_done_since = None
                while proc.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=2)
                    if proc.returncode is not None:
                        break
                    if all_done_since is None:
                        if _done_shards(root, folder) >= set(range(n_shards)):
                            all_done_since = time.monotonic()
                    elif time.monotonic() - all_done_since > SHUTDOWN_GRACE_S:
                        # Every shard is written: img2dataset only has to shut its pool down,
                        # which can hang (CPython multiprocessing); its results are complete.
                        proc.kill()
                        proc.wait()
                        return
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if proc.returncode != 0:
            tail = log_file.read_bytes()[-4000:].decode("utf-8", "replace")
            raise RuntimeError(f"img2dataset exited with {proc.returncode}:\n{tail}")

    # -- plan --------------------------------------------------------------------------------------
    def _make_plan(self, ctx: StageContext, folder: str, fp: str) -> tuple[pa.Table, pa.Table]:
        """The frozen list of URLs of ``folder`` (reused when made for ``fp``)."""
        root = ctx.root
        plan_dir = posixpath.join(folder, PLAN_DIR)
        plan = root.read_json(posixpath.join(plan_dir, "plan.json"))
        urls_path = posixpath.join(plan_dir, "urls.parquet")
        refused_path = posixpath.join(plan_dir, "refused.parquet")
        if (
            plan is not None
            and plan.get("fingerprint") == fp
            and root.exists(urls_path)
            and root.exists(refused_path)
        ):
            return root.read_table(urls_path), root.read_table(refused_path)
        root.remove(folder, recursive=True)  # another plan's shards: never mix them

        candidates = ctx.read_input(KEYWORD_FILTER, columns=["uid", "url", "caption"])
        policy, cache = self.policy(), {}
        keep, refused = [], {"uid": [], "url": [], "error_class": [], "error": []}
        uids = candidates.column("uid").to_pylist()
        for i, url in enumerate(candidates.column("url").to_pylist()):
            verdict = precheck_url(url, policy, cache)
            if verdict is None:
                keep.append(i)
            else:
                refused["uid"].append(uids[i])
                refused["url"].append(url)
                refused["error_class"].append(verdict[0])
                refused["error"].append(verdict[1])
        urls = candidates.take(pa.array(keep, pa.int64())).select(["uid", "url", "caption"])
        refused_t = pa.table(
            refused,
            schema=pa.schema(
                [
                    ("uid", pa.uint64()),
                    ("url", pa.string()),
                    ("error_class", pa.string()),
                    ("error", pa.string()),
                ]
            ),
        )
        root.write_table(urls_path, urls)
        root.write_table(refused_path, refused_t)
        root.write_json(
            posixpath.join(plan_dir, "plan.json"),
            {"fingerprint": fp, "urls": urls.num_rows, "refused": refused_t.num_rows},
        )
        return urls, refused_t

    def _retry_round(self, ctx: StageContext, committed: pa.Table) -> int:
        """Fetch the transient failures of ``committed`` again in a new (or the unfinished last)
        ``retry-NNN`` round; return how many URLs it fetched."""
        root, side = ctx.root, ctx.side_dir
        rounds = _retry_rounds(root, side)
        if rounds and not root.exists(posixpath.join(rounds[-1], PLAN_DIR, "complete.json")):
            folder = rounds[-1]  # a killed retry round: resume it
            urls = root.read_table(posixpath.join(folder, PLAN_DIR, "urls.parquet"))
        else:
            folder = posixpath.join(side, f"retry-{len(rounds) + 1:03d}")
            failed = committed.filter(
                pc.and_(
                    pc.equal(committed["status"], "failed"),
                    pc.is_in(committed["error_class"], pa.array(TRANSIENT_ERROR_CLASSES)),
                )
            )
            wanted = set(failed.column("uid").to_pylist())
            candidates = ctx.read_input(KEYWORD_FILTER, columns=["uid", "url", "caption"])
            mask = pc.is_in(candidates["uid"], pa.array(sorted(wanted), pa.uint64()))
            urls = candidates.filter(mask).select(["uid", "url", "caption"])
            root.remove(folder, recursive=True)
            root.write_table(posixpath.join(folder, PLAN_DIR, "urls.parquet"), urls)
        self._run_img2dataset(root, folder, urls.num_rows, ctx.scratch)
        _assemble_shards(root, folder, urls, self.settings.number_sample_per_shard)  # complete?
        root.write_json(posixpath.join(folder, PLAN_DIR, "complete.json"), {"urls": urls.num_rows})
        return urls.num_rows

    # -- run ---------------------------------------------------------------------------------------
    def run(self, ctx: StageContext) -> StageResult:
        root, side = ctx.root, ctx.side_dir
        fp = partition_fingerprint(root, self, ctx.partition)
        urls, refused = self._make_plan(ctx, side, fp)
        retried = 0
        if self.retry_failed:
            out_path = root.output_path(DOWNLOAD, ctx.partition.source, ctx.partition.name)
            if root.exists(out_path):
                committed = root.read_table(out_path)
                if _committed_matches(root, side, committed, urls, refused):
                    retried = self._retry_round(ctx, committed)
        self._run_img2dataset(root, side, urls.num_rows, ctx.scratch)

        rows = _assemble_shards(root, side, urls, self.settings.number_sample_per_shard)
        for folder in _retry_rounds(root, side):
            if root.exists(posixpath.join(folder, PLAN_DIR, "complete.json")):
                r_urls = root.read_table(posixpath.join(folder, PLAN_DIR, "urls.parquet"))
                rows.update(
                    _assemble_shards(root, folder, r_urls, self.settings.number_sample_per_shard)
                )
        for r in refused.to_pylist():
            rows[r["uid"]] = _failed_row(r["uid"], r["error_class"], r["error"], r["url"])

        uids = urls.column("uid").to_pylist() + refused.column("uid").to_pylist()
        all_urls = urls.column("url").to_pylist() + refused.column("url").to_pylist()
        url_of = dict(zip(uids, all_urls, strict=True))
        ordered = [rows[u] for u in sorted(uids)]
        output = pa.Table.from_pylist(
            [{k: r[k] for k in DOWNLOADS.names} for r in ordered], DOWNLOADS
        )
        failed = [r for r in ordered if r["status"] != "success"]
        removed = pa.table(
            {
                "uid": pa.array([r["uid"] for r in failed], pa.uint64()),
                "reason": pa.array([r["error_class"] for r in failed], pa.string()),
                "detail": pa.array(
                    [dumps_detail(url=url_of[r["uid"]], error=r["error"]) for r in failed],
                    pa.string(),
                ),
            }
        )
        counts = {
            "candidates": len(uids),
            "downloaded": len(ordered) - len(failed),
            "failed": len(failed),
            "refused_before_fetch": refused.num_rows,
            "retried": retried,
        }
        return StageResult(output=output, removed=removed, counts=counts)


# -- assembling img2dataset's results --------------------------------------------------------------


def _shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def _done_shards(root: DatasetRoot, folder: str) -> set[int]:
    done = set()
    if not root.exists(folder):
        return done
    for path in root.fs.glob(posixpath.join(folder, "*_stats.json")):
        head = posixpath.basename(path).split("_")[0]
        if head.isdigit():
            done.add(int(head))
    return done


def _retry_rounds(root: DatasetRoot, side: str) -> list[str]:
    return sorted(root.fs.glob(posixpath.join(side, "retry-[0-9][0-9][0-9]")))


def _committed_matches(root, side, committed, urls, refused) -> bool:
    planned = set(urls.column("uid").to_pylist()) | set(refused.column("uid").to_pylist())
    return set(committed.column("uid").to_pylist()) == planned


def _failed_row(uid: int, error_class: str, error: str | None, url: str | None = None) -> dict:
    return {
        "uid": uid,
        "status": "failed",
        "error_class": error_class,
        "error": error,
        "sha256": None,
        "width": None,
        "height": None,
        "bytes": None,
        "tar": None,
        "key": None,
    }


def _read_tar_images(root: DatasetRoot, tar_path: str) -> dict[str, tuple[str, bytes]]:
    """``{key: (member name, bytes)}`` of the image members of a webdataset tar."""
    images: dict[str, tuple[str, bytes]] = {}
    with root.fs.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if ext in ("json", "txt"):
                continue
            data = tar.extractfile(member).read()
            images[key] = (member.name, data)
    return images


def _assemble_shards(root: DatasetRoot, folder: str, urls: pa.Table, per_shard: int) -> dict:
    """One DOWNLOADS row (as a dict) per uid of ``urls``, from img2dataset's finished shards."""
    n_shards = math.ceil(urls.num_rows / per_shard)
    missing = sorted(set(range(n_shards)) - _done_shards(root, folder))
    if missing:
        raise RuntimeError(
            f"img2dataset did not finish shards {missing} of {folder}; rerun to resume them"
        )
    rows: dict[int, dict] = {}
    for shard_id in range(n_shards):
        base = posixpath.join(folder, _shard_name(shard_id))
        meta = root.read_table(
            base + ".parquet", columns=["uid", "key", "status", "error_message", "width", "height"]
        ).to_pylist()
        images = _read_tar_images(root, base + ".tar") if root.exists(base + ".tar") else {}
        tar_rel = posixpath.relpath(base + ".tar", root.path)
        for m in meta:
            uid = m["uid"]
            if m["status"] != "success":
                rows[uid] = _failed_row(uid, classify_error(m["error_message"]), m["error_message"])
                continue
            if m["key"] not in images:
                rows[uid] = _failed_row(uid, "other", f"key {m['key']} missing from {tar_rel}")
                continue
            _, data = images[m["key"]]
            is_image, width, height = sniff_image(data)
            if not is_image:
                head = data[:16]
                rows[uid] = _failed_row(uid, "not_image", f"not a recognised image: {head!r}")
                continue
            rows[uid] = {
                "uid": uid,
                "status": "success",
                "error_class": None,
                "error": None,
                "sha256": hashlib.sha256(data).hexdigest(),
                "width": m["width"] if m["width"] is not None else width,
                "height": m["height"] if m["height"] is not None else height,
                "bytes": len(data),
                "tar": tar_rel,
                "key": m["key"],
            }
    missing_uids = set(urls.column("uid").to_pylist()) - rows.keys()
    if missing_uids:
        raise RuntimeError(f"{len(missing_uids)} URLs of {folder} have no img2dataset result")
    return rows


# -- entry points ----------------------------------------------------------------------------------


def download_partition(
    root: DatasetRoot, part: Partition, settings: DownloadConfig | None = None
) -> Outcome:
    """Run the download stage on one partition (skipped when its output is current)."""
    return run_partition(root, DownloadStage(settings), part)


def retry_failed(
    root: DatasetRoot, part: Partition, settings: DownloadConfig | None = None
) -> Outcome:
    """``rs5m build --retry-failed`` for one partition: fetch again only the committed failures
    of a transient class (timeout, http_5xx, connection) and commit the merged result.

    Nothing happens (``skipped``) when the partition has no such failure. The marker is removed
    first so that ``run_partition`` reruns the partition; a retry killed half-way is resumed by
    the next ``retry_failed`` (or assembled without the unfinished round by a normal run).
    """
    stage = DownloadStage(settings, retry_failed=True)
    out_path = root.output_path(DOWNLOAD, part.source, part.name)
    marker_path = root.marker_path(DOWNLOAD, part.source, part.name)
    marker = root.read_json(marker_path)
    if marker is None or not root.exists(out_path):
        return run_partition(root, stage, part)  # nothing committed yet: a normal run
    try:
        current = marker.get("fingerprint") == partition_fingerprint(root, stage, part)
    except Exception:
        current = False
    if not current:
        return run_partition(root, stage, part)  # stale: the normal run redoes it anyway
    committed = root.read_table(out_path, columns=["status", "error_class"])
    transient = pc.sum(
        pc.and_(
            pc.equal(committed["status"], "failed"),
            pc.is_in(committed["error_class"], pa.array(TRANSIENT_ERROR_CLASSES)),
        ).cast(pa.int64())
    ).as_py()
    if not transient:
        counts = marker.get("counts", {})
        return Outcome(
            DOWNLOAD, part.id, "skipped", counts.get("rows_out", 0), counts.get("removed", 0)
        )
    root.remove(marker_path)
    return run_partition(root, stage, part)
