"""Run one stage over many partitions as Prefect tasks, with a progress bar and a summary."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from prefect import task
from prefect.futures import as_completed
from prefect.states import Failed, State
from tqdm import tqdm

from storage.root import DatasetRoot
from storage.stage import Outcome, Partition, Stage, run_partition, summarize


@task(name="stage-partition", task_run_name="{stage_name} {partition_id}")
def stage_partition(
    root_url: str,
    stage: Stage,
    part: Partition,
    stage_name: str,
    partition_id: str,
    attempts: int = 1,
) -> Outcome | State:
    """One partition; a failure ends the task run Failed (one log line, no traceback: the
    error is in the partition's failure marker), after ``attempts`` tries."""
    for _ in range(max(1, attempts)):
        outcome = run_partition(DatasetRoot(root_url), stage, part)
        if outcome.status != "failed":
            return outcome
    return Failed(message=f"{stage_name} {partition_id}: {outcome.error}", data=outcome)


def _outcome_of(future, stage_name: str, part: Partition) -> Outcome:
    state = future.wait() or future.state
    try:
        result = state.result(raise_on_failure=False)
    except Exception as exc:  # an error outside the stage (serialisation, crash)
        result = exc
    if isinstance(result, Outcome):
        return result
    return Outcome(stage_name, part.id, "failed", error=repr(result))


def run_stage(
    root: DatasetRoot,
    stage_for: Callable[[Partition], Stage],
    stage_name: str,
    partitions: Sequence[Partition],
    retries: int = 0,
    sequential: bool = False,
    show_progress: bool = True,
) -> list[Outcome]:
    """Map ``stage_for(partition)`` over partitions; sequential stages go one at a time in
    the given order (deduplication, whose decisions depend on the partitions before)."""
    submit = stage_partition
    bar = tqdm(
        total=len(partitions),
        desc=f"{stage_name:>15}",
        unit="part",
        disable=not show_progress or not partitions,
        file=sys.stderr,
        leave=False,
    )
    outcomes: list[Outcome] = []
    try:
        if sequential:
            for part in partitions:
                fut = submit.submit(
                    root.url, stage_for(part), part, stage_name, part.id, retries + 1
                )
                fut.wait()
                outcomes.append(_outcome_of(fut, stage_name, part))
                bar.update()
        else:
            futures = {
                submit.submit(root.url, stage_for(p), p, stage_name, p.id, retries + 1): p
                for p in partitions
            }
            for fut in as_completed(list(futures)):
                outcomes.append(_outcome_of(fut, stage_name, futures[fut]))
                bar.update()
    finally:
        bar.close()
    outcomes.sort(key=lambda o: o.partition)
    return outcomes


def summary_line(stage_name: str, outcomes: Sequence[Outcome]) -> str:
    c = summarize(outcomes)
    rows = sum(o.rows for o in outcomes if o.status in ("done", "skipped"))
    removed = sum(o.removed for o in outcomes if o.status in ("done", "skipped"))
    work = "no new work" if c["done"] == 0 and c["failed"] == 0 else f"{c['done']} processed"
    parts = [f"{stage_name}: {work}", f"{c['skipped']} up to date"]
    if c["failed"]:
        parts.append(f"{c['failed']} FAILED")
    if c["pending"]:
        parts.append(f"{c['pending']} waiting on an earlier stage")
    return ", ".join(parts) + f" | {rows:,} rows kept, {removed:,} removed"
