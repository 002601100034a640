"""Benchmark: the download stage against a bare ``img2dataset.download`` call, and the validate
stage's throughput.

Both downloads use the same keyword arguments (``DownloadStage.img2dataset_kwargs``), the same URL
list and the same loopback server (``rs5m.image_server.ImageServer``), in one run, alternating
(bare, stage, stage, bare, ...) so that load changes hit both. The stage's time includes
everything it adds: pre-resolving hosts, freezing the plan, the worker subprocess, the guarded
urllib opener, reading every tar back (sha256, header sniff) and committing output and ledger.

    python bench/download.py --n 2000 --repeats 2

Images: ``../shared/fixtures/eurosat_rgb`` when present (1,000 real tiles), else the bundled demo
images; URLs are made unique with a query string when the list is longer than the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from rs5m.image_server import ImageServer  # noqa: E402
from schemas.download_config import DownloadConfig, ValidateConfig  # noqa: E402
from schemas.tables import CANDIDATES, DOWNLOAD, KEYWORD_FILTER, sample_uid  # noqa: E402
from storage.root import DatasetRoot  # noqa: E402
from storage.stage import Partition, Stage, StageContext, StageResult, run_partition  # noqa: E402
from tasks.download import DownloadStage  # noqa: E402
from tasks.validate import ValidateStage  # noqa: E402

SHARED = PROJECT.parent / "shared" / "fixtures" / "eurosat_rgb"
DEMO = PROJECT / "rs5m" / "demo_data" / "images"


class Candidates(Stage):
    name = KEYWORD_FILTER
    version = "1"

    def __init__(self, table: pa.Table):
        self.table = table

    def params(self) -> dict:
        return {"n": self.table.num_rows, "first": self.table.column("url")[0].as_py()}

    def run(self, ctx: StageContext) -> StageResult:
        return StageResult(output=self.table)


def image_files() -> tuple[Path, list[str]]:
    folder = SHARED if SHARED.is_dir() else DEMO
    files = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".jpg", ".png")
    )
    return folder, files


def candidates(srv: ImageServer, files: list[str], n: int) -> pa.Table:
    urls = []
    for i in range(n):
        url = srv.url(files[i % len(files)])
        urls.append(url if i < len(files) else f"{url}?copy={i}")
    return pa.table(
        {
            "uid": pa.array([sample_uid("bench", u) for u in urls], pa.uint64()),
            "source": ["bench"] * n,
            "partition": ["p0"] * n,
            "url": urls,
            "caption": [f"caption {i}" for i in range(n)],
            "width": pa.nulls(n, pa.int64()),
            "height": pa.nulls(n, pa.int64()),
            "keywords": pa.array([["aerial"]] * n, pa.list_(pa.string())),
        },
        schema=CANDIDATES,
    )


def bare(table: pa.Table, settings: DownloadConfig, work: Path) -> float:
    import img2dataset

    url_list = work / "urls.parquet"
    pq.write_table(table.select(["uid", "url", "caption"]), url_list)
    out = work / "bare"
    kwargs = DownloadStage(settings).img2dataset_kwargs(str(url_list), str(out))
    started = time.perf_counter()
    img2dataset.download(**kwargs)
    return time.perf_counter() - started


def stage(table: pa.Table, settings: DownloadConfig, work: Path) -> tuple[float, DatasetRoot]:
    root = DatasetRoot(work / "root")
    part = Partition("bench", "p0")
    assert run_partition(root, Candidates(table), part).status == "done"
    started = time.perf_counter()
    out = run_partition(root, DownloadStage(settings), part)
    elapsed = time.perf_counter() - started
    if out.status != "done":
        raise RuntimeError(out.error)
    return elapsed, root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="URLs per download")
    ap.add_argument("--repeats", type=int, default=2, help="pairs of (bare, stage) runs")
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    settings = DownloadConfig(
        allow_hosts=("127.0.0.1",),
        processes_count=args.processes,
        thread_count=args.threads,
        number_sample_per_shard=args.per_shard,
    )
    folder, files = image_files()
    work = Path(tempfile.mkdtemp(prefix="rs5m-bench-download-"))
    times: dict[str, list[float]] = {"bare": [], "stage": []}
    last_root = None
    try:
        with ImageServer(folder) as srv:
            table = candidates(srv, files, args.n)
            for r in range(args.repeats):
                order = ("bare", "stage") if r % 2 == 0 else ("stage", "bare")
                for kind in order:
                    run_dir = work / f"{kind}-{r}"
                    run_dir.mkdir()
                    if kind == "bare":
                        times["bare"].append(bare(table, settings, run_dir))
                    else:
                        elapsed, last_root = stage(table, settings, run_dir)
                        times["stage"].append(elapsed)
                    print(
                        f"  {kind:5s} run {r}: {args.n / times[kind][-1]:7.1f} images/s", flush=True
                    )

        downloads = last_root.read_table(last_root.output_path(DOWNLOAD, "bench", "p0"))
        n_ok = sum(1 for s in downloads.column("status").to_pylist() if s == "success")
        part = Partition("bench", "p0")
        cpu0, wall0 = time.process_time(), time.perf_counter()
        out = run_partition(last_root, ValidateStage(ValidateConfig(min_side=16)), part)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if out.status != "done":
            raise RuntimeError(out.error)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    bare_s, stage_s = statistics.median(times["bare"]), statistics.median(times["stage"])
    result = {
        "n_urls": args.n,
        "images": folder.name,
        "threads": args.threads,
        "processes": args.processes,
        "bare_images_per_s": round(args.n / bare_s, 1),
        "stage_images_per_s": round(args.n / stage_s, 1),
        "ratio_stage_over_bare": round(bare_s / stage_s, 3),
        "runs_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "downloaded": n_ok,
        "validate_images": out.rows + out.removed,
        "validate_images_per_s": round((out.rows + out.removed) / wall, 1),
        "validate_images_per_cpu_s": round((out.rows + out.removed) / cpu, 1),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print("| measure | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
