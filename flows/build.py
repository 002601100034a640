"""The parent build flow: lock the root, run the branches, publish statistics, announce."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from prefect.task_runners import ThreadPoolTaskRunner

from flows.partitions import discover
from flows.pub11 import pub11_flow
from schemas.config import BuildConfig
from storage import catalog
from storage.lock import build_lock
from storage.root import DatasetRoot

BUILD_COMPLETED = "rs5m.build.completed"


def publish_statistics(root: DatasetRoot) -> list[dict[str, Any]]:
    """Write ``stats/stats.parquet`` + ``.json`` and return the per-source table."""
    import pyarrow as pa

    with catalog.connect(root, persistent=False) as con:
        rows = catalog.statistics(con)
    table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in catalog.STATS_COLUMNS})
    root.write_table(root.join("stats", "stats.parquet"), table)
    root.write_json(root.join("stats", "stats.json"), rows)
    return rows


@flow(name="build", log_prints=False)
def build_flow(
    config: dict[str, Any], root: str, lock_wait: float = 0.0, show_progress: bool = True
) -> dict[str, Any]:
    """Run every enabled stage on every partition; only what changed does any work."""
    logger = get_run_logger()
    cfg = BuildConfig.model_validate(config)
    dataset = DatasetRoot(root)
    started = time.time()
    with build_lock(dataset, wait=lock_wait):
        partitions = discover(cfg)
        catalog.write_plan(
            dataset,
            stages=cfg.run.stages,
            partitions=[
                {"source": p.source, "name": p.name, "raw_input": p.raw_input} for p in partitions
            ],
        )
        runner = ThreadPoolTaskRunner(max_workers=cfg.run.workers)
        stage_counts = pub11_flow.with_options(task_runner=runner)(
            config=cfg.model_dump(mode="json", by_alias=True), root=dataset.url, show_progress=show_progress
        )
        rows = publish_statistics(dataset)
    if rows:
        create_table_artifact(
            key="rs5m-build-stats",
            table=rows,
            description=f"Per-source statistics of the build on {dataset.url}",
        )
    failed = sum(c.get("failed", 0) for c in stage_counts.values())
    processed = sum(c.get("done", 0) for c in stage_counts.values())
    summary = {
        "root": dataset.url,
        "stages": stage_counts,
        "failed_partitions": failed,
        "processed_partitions": processed,
        "statistics": rows,
        "seconds": round(time.time() - started, 1),
    }
    emit_event(
        event=BUILD_COMPLETED,
        resource={"prefect.resource.id": f"rs5m.dataset.{dataset.url}"},
        payload={"root": dataset.url, "failed_partitions": failed, "processed": processed},
    )
    logger.info("build finished: %s partitions processed, %s failed", processed, failed)
    return summary
