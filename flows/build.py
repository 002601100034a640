"""The parent build flow: lock the root, run the branches, publish statistics, announce."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from prefect.task_runners import ThreadPoolTaskRunner

from flows.partitions import discover
from flows.pub11 import pub11_flow
from schemas.config import BuildConfig, load_config
from schemas.tables import DEDUP, GEOTAG, OUTLIERS, VALIDATE
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


@task(name="shard")
def shard_task(root_url: str, config: BuildConfig, reshard: bool) -> dict[str, Any]:
    """Kept samples of every branch into webdataset shards (global, incremental)."""
    from tasks.shard import build_shards

    kept_from = next((s for s in (OUTLIERS, DEDUP, VALIDATE) if s in config.run.stages), VALIDATE)
    manifest = build_shards(
        DatasetRoot(root_url),
        branches={s.name: s.branch for s in config.sources},
        config=config.shard,
        kept_from=kept_from,
        reshard=reshard,
    )
    return {"shards": len(manifest.shards), "samples": sum(s.samples for s in manifest.shards)}


def publish_geo_statistics(root: DatasetRoot) -> dict[str, Any] | None:
    """Places per source and per country, and a PNG map of sample locations, under stats/.

    Counted over the samples in the shards when there are shards, else over every geotagged
    candidate."""
    from tasks.geo.stats import places_per_country, places_per_source, write_location_map

    with catalog.connect(root, persistent=False) as con:
        if not con.execute(
            "SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [GEOTAG]
        ).fetchall()[0][0]:
            return None
        samples = root.join("shards", "samples.parquet")
        if root.exists(samples):
            keep = f"SELECT uid, source FROM read_parquet('{root.query_url(samples)}')"
        else:
            keep = f'SELECT uid, _source AS source FROM "{GEOTAG}"'
        sources = con.sql(keep).to_arrow_table()
        geotags = con.sql(
            f'SELECT g.* EXCLUDE (_source) FROM "{GEOTAG}" g SEMI JOIN ({keep}) k USING (uid)'
        ).to_arrow_table()
    per_source = places_per_source(geotags, sources)
    per_country = places_per_country(geotags)
    root.write_table(root.join("stats", "places_per_source.parquet"), per_source)
    root.write_table(root.join("stats", "places_per_country.parquet"), per_country)
    write_location_map(geotags, root.query_url(root.join("stats", "locations.png")))
    return {"per_source": per_source.to_pylist(), "countries": per_country.num_rows}


@flow(name="build", log_prints=False)
def build_flow(
    config: dict[str, Any] | str,
    root: str,
    lock_wait: float = 0.0,
    show_progress: bool = True,
    retry_failed: bool = False,
    reshard: bool = False,
) -> dict[str, Any]:
    """Run every enabled stage on every partition; only what changed does any work.

    ``config`` is the configuration itself or the path of its TOML file (deployments)."""
    logger = get_run_logger()
    cfg = load_config(config) if isinstance(config, str) else BuildConfig.model_validate(config)
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
            config=cfg.model_dump(mode="json", by_alias=True),
            root=dataset.url,
            show_progress=show_progress,
            retry_failed=retry_failed,
        )
        shards = None
        if cfg.run.shard and VALIDATE in cfg.run.stages:
            shards = shard_task(dataset.url, cfg, reshard)
            print(f"shard: {shards['samples']:,} samples in {shards['shards']} shards", flush=True)
        rows = publish_statistics(dataset)
        geo = publish_geo_statistics(dataset)
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
        "shards": shards,
        "geo": geo,
        "seconds": round(time.time() - started, 1),
    }
    emit_event(
        event=BUILD_COMPLETED,
        resource={"prefect.resource.id": f"rs5m.dataset.{dataset.url}"},
        payload={"root": dataset.url, "failed_partitions": failed, "processed": processed},
    )
    logger.info("build finished: %s partitions processed, %s failed", processed, failed)
    return summary
