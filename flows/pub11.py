"""The PUB11 branch: web metadata through every enabled stage, partition by partition."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.registry import SEQUENTIAL_STAGES, StageFactory
from flows.runner import run_stage, summary_line
from schemas.config import BuildConfig
from schemas.tables import DOWNLOAD
from storage.root import DatasetRoot
from storage.stage import Outcome, Partition, summarize


@task(name="retry-failed-downloads", task_run_name="retry {partition_id}")
def retry_download_partition(
    root_url: str, config: BuildConfig, part: Partition, partition_id: str
) -> Outcome:
    from tasks.download import retry_failed

    return retry_failed(DatasetRoot(root_url), part, config.download)


def run_pub11(
    root: DatasetRoot,
    config: BuildConfig,
    partitions: Sequence[Partition],
    show_progress: bool = True,
    retry_failed: bool = False,
) -> dict[str, list[Outcome]]:
    """Each enabled stage in order over the partitions its upstream completed in this run.

    ``retry_failed`` first refetches, in every committed download partition, the URLs that
    failed for a transient reason (timeout, 5xx, connection); the stages after it then rerun
    exactly where that changed something.
    """
    logger = get_run_logger()
    factory = StageFactory(config, root)
    results: dict[str, list[Outcome]] = {}
    ready = list(partitions)
    for stage_name in factory.enabled_stages():
        if stage_name == DOWNLOAD and retry_failed:
            futures = [
                retry_download_partition.submit(root.url, config, p, p.id)
                for p in ready
                if root.exists(root.marker_path(DOWNLOAD, p.source, p.name))
            ]
            retried = [f.result(raise_on_failure=False) for f in futures]
            line = summary_line("download retry", [o for o in retried if isinstance(o, Outcome)])
            print(line, flush=True)
        outcomes = run_stage(
            root,
            lambda p, s=stage_name: factory.make(s, p),
            stage_name,
            ready,
            retries=config.run.retries,
            sequential=stage_name in SEQUENTIAL_STAGES,
            show_progress=show_progress,
        )
        blocked = [p for p in partitions if p not in ready]
        outcomes += [
            Outcome(stage_name, p.id, "pending", error="an earlier stage did not complete")
            for p in blocked
        ]
        results[stage_name] = outcomes
        line = summary_line(stage_name, outcomes)
        logger.info(line)
        print(line, flush=True)
        for o in outcomes:
            if o.status == "failed":
                print(f"  failed {o.partition}: {o.error}", flush=True)
        ok = {o.partition for o in outcomes if o.status in ("done", "skipped")}
        ready = [p for p in ready if p.id in ok]
    return results


@flow(name="pub11", task_runner=ThreadPoolTaskRunner(max_workers=2))
def pub11_flow(
    config: dict, root: str, show_progress: bool = True, retry_failed: bool = False
) -> dict[str, dict[str, int]]:
    """Prefect entry point of the branch (a subflow of ``build``, or run alone)."""
    from flows.partitions import discover

    cfg = BuildConfig.model_validate(config)
    results = run_pub11(DatasetRoot(root), cfg, discover(cfg), show_progress, retry_failed)
    return {stage: summarize(outs) for stage, outs in results.items()}
