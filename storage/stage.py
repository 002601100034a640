"""The contract every stage follows, and the runner that commits one partition atomically.

A stage is a small class (in ``tasks/``) with a name, a version, the parameters its output
depends on, the upstream stages it reads, and a ``run`` that maps one partition to an output
table plus the rows it removed. The runner here does everything else: decides from the marker
whether the partition is already done, gives the stage a scratch folder, writes output and
ledger atomically, writes the marker last, and records failures for ``rs5m status``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.tables import LEDGER
from storage.fingerprint import file_digest, fingerprint, table_digest
from storage.root import DatasetRoot


class UpstreamNotReady(RuntimeError):
    """An upstream stage has not committed this partition yet."""


@dataclass(frozen=True)
class Partition:
    """One unit of work: one input shard of one source."""

    source: str
    name: str
    raw_input: str | None = None  # the metadata file (first stage only), an fsspec URL or path

    @property
    def id(self) -> str:
        return f"{self.source}/{self.name}"


@dataclass
class StageResult:
    """What a stage returns for one partition.

    ``output`` is an Arrow table, or the path of a parquet file the stage wrote in its scratch
    folder (for streaming stages that never hold the whole partition in memory).
    ``removed`` holds ``uid, reason, detail`` rows; source, partition and stage are filled in.
    ``counts`` are extra numbers kept in the marker (e.g. ``rows_in`` of the raw file).
    """

    output: pa.Table | str
    removed: pa.Table | None = None
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a stage may touch while it runs one partition."""

    root: DatasetRoot
    partition: Partition
    scratch: Path  # local, private to this attempt, deleted afterwards
    stage: str

    @property
    def source(self) -> str:
        return self.partition.source

    def input_path(self, stage: str) -> str:
        return self.root.output_path(stage, self.partition.source, self.partition.name)

    def read_input(self, stage: str, columns: list[str] | None = None) -> pa.Table:
        return self.root.read_table(self.input_path(stage), columns=columns)

    @property
    def side_dir(self) -> str:
        """A folder in the root for this partition's side files (tar shards, ...)."""
        return self.root.side_dir(self.stage, self.partition.source, self.partition.name)


class Stage(ABC):
    """One pipeline step over one partition. Subclasses set ``name``, ``version``, ``inputs``."""

    name: ClassVar[str]
    version: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()  # upstream stages read for the same partition

    def params(self) -> dict[str, Any]:
        """The parameters the output depends on (they enter the fingerprint)."""
        return {}

    @abstractmethod
    def run(self, ctx: StageContext) -> StageResult: ...


@dataclass
class Outcome:
    """How one partition went in one run."""

    stage: str
    partition: str
    status: Literal["done", "skipped", "failed", "pending"]
    rows: int = 0
    removed: int = 0
    seconds: float = 0.0
    error: str | None = None


def _input_digests(root: DatasetRoot, stage: Stage, part: Partition) -> dict[str, str]:
    digests: dict[str, str] = {}
    if part.raw_input is not None and not stage.inputs:  # only a first stage reads the raw file
        digests["raw"] = file_digest(part.raw_input)
    for upstream in stage.inputs:
        marker = root.read_json(root.marker_path(upstream, part.source, part.name))
        if marker is None:
            raise UpstreamNotReady(f"{upstream} has not committed {part.id}")
        digests[upstream] = marker["output_digest"]
    return digests


def partition_fingerprint(root: DatasetRoot, stage: Stage, part: Partition) -> str:
    """The fingerprint this partition's output must carry to count as up to date."""
    digests = _input_digests(root, stage, part)
    return fingerprint(stage.name, stage.version, stage.params(), digests)


def _ledger_table(removed: pa.Table | None, stage: str, part: Partition) -> pa.Table:
    if removed is None or removed.num_rows == 0:
        return LEDGER.empty_table()
    n = removed.num_rows
    detail = removed.column("detail") if "detail" in removed.column_names else pa.nulls(n)
    return pa.table(
        {
            "uid": removed.column("uid").cast(pa.uint64()),
            "source": pa.array([part.source] * n, pa.string()),
            "partition": pa.array([part.name] * n, pa.string()),
            "stage": pa.array([stage] * n, pa.string()),
            "reason": removed.column("reason").cast(pa.string()),
            "detail": detail.cast(pa.string()),
        },
        schema=LEDGER,
    )


def run_partition(root: DatasetRoot, stage: Stage, part: Partition) -> Outcome:
    """Run ``stage`` on ``part`` unless its committed output is current; never raises for
    errors inside the stage: they are written to the partition's failure marker."""
    started = time.monotonic()
    try:
        fp = partition_fingerprint(root, stage, part)
    except UpstreamNotReady as exc:
        return Outcome(stage.name, part.id, "pending", error=str(exc))
    except FileNotFoundError:
        return _fail(root, stage, part, None, f"input file not found: {part.raw_input}", started)

    marker_path = root.marker_path(stage.name, part.source, part.name)
    marker = root.read_json(marker_path)
    output_path = root.output_path(stage.name, part.source, part.name)
    if marker and marker.get("fingerprint") == fp and root.exists(output_path):
        counts = marker.get("counts", {})
        return Outcome(
            stage.name, part.id, "skipped", counts.get("rows_out", 0), counts.get("removed", 0)
        )

    root.remove_stale_temporaries(root.stage_dir(stage.name, part.source), f"{part.name}.")
    root.remove_stale_temporaries(root.join("ledger", stage.name, part.source), f"{part.name}.")
    scratch = Path(tempfile.mkdtemp(prefix=f"rs5m-{stage.name}-"))
    try:
        ctx = StageContext(root=root, partition=part, scratch=scratch, stage=stage.name)
        result = stage.run(ctx)
        outcome = _commit(root, stage, part, fp, result, scratch, started)
    except Exception as exc:  # the stage's own error: recorded, and the run goes on
        detail = f"{type(exc).__name__}: {exc}"
        return _fail(root, stage, part, fp, detail, started, traceback.format_exc())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return outcome


def _commit(
    root: DatasetRoot,
    stage: Stage,
    part: Partition,
    fp: str,
    result: StageResult,
    scratch: Path,
    started: float,
) -> Outcome:
    local_out = result.output
    if isinstance(local_out, pa.Table):
        path = scratch / "output.parquet"
        pq.write_table(local_out, path, compression="zstd")
        local_out = str(path)
    ledger = _ledger_table(result.removed, stage.name, part)
    ledger_local = scratch / "ledger.parquet"
    pq.write_table(ledger, ledger_local, compression="zstd")

    with duckdb.connect() as con:
        digest = table_digest(con, local_out)
        rows_out = pq.ParquetFile(local_out).metadata.num_rows

    # Data first, marker last: a run killed in between leaves no marker and is redone.
    root.put_file(local_out, root.output_path(stage.name, part.source, part.name))
    root.put_file(str(ledger_local), root.ledger_path(stage.name, part.source, part.name))
    root.remove(root.failure_path(stage.name, part.source, part.name))
    seconds = round(time.monotonic() - started, 3)
    counts = {"rows_out": rows_out, "removed": ledger.num_rows, **result.counts}
    root.write_json(
        root.marker_path(stage.name, part.source, part.name),
        {
            "stage": stage.name,
            "version": stage.version,
            "source": part.source,
            "partition": part.name,
            "raw_input": part.raw_input,
            "params": stage.params(),
            "fingerprint": fp,
            "output_digest": digest,
            "counts": counts,
            "seconds": seconds,
            "committed_at": time.time(),
        },
    )
    return Outcome(stage.name, part.id, "done", rows_out, ledger.num_rows, seconds)


def _fail(
    root: DatasetRoot,
    stage: Stage,
    part: Partition,
    fp: str | None,
    message: str,
    started: float,
    trace: str | None = None,
) -> Outcome:
    root.write_json(
        root.failure_path(stage.name, part.source, part.name),
        {
            "stage": stage.name,
            "source": part.source,
            "partition": part.name,
            "raw_input": part.raw_input,
            "fingerprint": fp,
            "error": message,
            "traceback": trace,
            "failed_at": time.time(),
        },
    )
    return Outcome(stage.name, part.id, "failed", seconds=time.monotonic() - started, error=message)


def summarize(outcomes: Sequence[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {"done": 0, "skipped": 0, "failed": 0, "pending": 0}
    for o in outcomes:
        counts[o.status] += 1
    return counts


def dumps_detail(**fields: Any) -> str:
    """Ledger ``detail`` as compact JSON."""
    return json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
