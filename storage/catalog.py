"""DuckDB over the dataset root: views of every stage's files, the statistics table, status.

``catalog.duckdb`` holds only views; delete it and the next query recreates it from the files.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import duckdb

from schemas.tables import DEDUP, DOWNLOAD, KEYWORD_FILTER, OUTLIERS, VALIDATE
from storage.root import LEDGER_DIR, STAGES_DIR, DatasetRoot

STATS_COLUMNS = (
    "source",
    "amount",
    "after_keyword_filter",
    "downloaded",
    "invalid_removed",
    "duplicates_removed",
    "outliers_removed",
    "remain",
)
_SOURCE_FROM_PATH = r"regexp_extract(filename, '/stages/[^/]+/([^/]+)/[^/]+\.parquet$', 1)"
_MARKER_COLUMNS = {
    "stage": "VARCHAR",
    "source": "VARCHAR",
    "partition": "VARCHAR",
    "raw_input": "VARCHAR",
    "fingerprint": "VARCHAR",
    "counts": "JSON",
    "seconds": "DOUBLE",
    "committed_at": "DOUBLE",
}
_FAILURE_COLUMNS = {
    "stage": "VARCHAR",
    "source": "VARCHAR",
    "partition": "VARCHAR",
    "raw_input": "VARCHAR",
    "error": "VARCHAR",
    "failed_at": "DOUBLE",
}


def connect(root: DatasetRoot, persistent: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the root's views; offline (no extension auto-install)."""
    config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    con = None
    if persistent and root.is_local:
        with contextlib.suppress(duckdb.IOException):  # held by another process: use memory
            con = duckdb.connect(root.join("catalog.duckdb"), config=config)
    if con is None:
        con = duckdb.connect(config=config)
    if not root.is_local:
        con.register_filesystem(root.fs)
    refresh_views(con, root)
    return con


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def refresh_views(con: duckdb.DuckDBPyConnection, root: DatasetRoot) -> list[str]:
    """(Re)create one view per stage with files, plus ``ledger``, ``markers``, ``failures``."""
    created = []
    for stage_dir in root.glob(f"{STAGES_DIR}/*"):
        stage = stage_dir.rsplit("/", 1)[-1]
        if not root.glob(f"{STAGES_DIR}/{stage}/*/*.parquet"):
            continue
        pattern = root.query_url(root.join(STAGES_DIR, stage, "*", "*.parquet"))
        con.execute(
            f'CREATE OR REPLACE VIEW "{stage}" AS SELECT * EXCLUDE (filename), '
            f"{_SOURCE_FROM_PATH} AS _source FROM read_parquet({_lit(pattern)}, "
            "union_by_name=true, filename=true)"
        )
        created.append(stage)
    ledger = root.query_url(root.join(LEDGER_DIR, "*", "*", "*.parquet"))
    if root.glob(f"{LEDGER_DIR}/*/*/*.parquet"):
        con.execute(
            f"CREATE OR REPLACE VIEW ledger AS SELECT * FROM read_parquet({_lit(ledger)}, "
            "union_by_name=true)"
        )
    else:
        con.execute(
            "CREATE OR REPLACE VIEW ledger AS SELECT NULL::UBIGINT AS uid, NULL AS source, "
            "NULL AS partition, NULL AS stage, NULL AS reason, NULL AS detail WHERE false"
        )
    for view, suffix, columns in (
        ("markers", "done", _MARKER_COLUMNS),
        ("failures", "failed", _FAILURE_COLUMNS),
    ):
        if root.glob(f"{STAGES_DIR}/*/*/*.{suffix}.json"):
            pattern = root.query_url(root.join(STAGES_DIR, "*", "*", f"*.{suffix}.json"))
            spec = "{" + ", ".join(f"'{n}': '{t}'" for n, t in columns.items()) + "}"
            con.execute(
                f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_json({_lit(pattern)}, "
                f"columns={spec}, format='auto')"
            )
        else:
            cols = ", ".join(f"NULL::{t} AS {n}" for n, t in columns.items())
            con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT {cols} WHERE false")
    return created


def _has_view(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM duckdb_views() WHERE view_name = ? AND NOT internal", [name]
        ).fetchall()[0][0]
    )


def statistics(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The RS5M paper's per-source table, plus a total row.

    A column is empty (None) for a source whose stage has not committed any partition.
    ``remain`` is ``downloaded - invalid - duplicates - outliers`` once downloading ran, and the
    keyword filter's output before that.
    """
    ran = {
        (stage, source)
        for stage, source in con.execute("SELECT DISTINCT stage, source FROM markers").fetchall()
    }
    sources = sorted({source for _, source in ran})
    kw = {
        s: (a, b)
        for s, a, b in con.execute(
            "SELECT source, sum((counts->>'rows_in')::BIGINT), sum((counts->>'rows_out')::BIGINT)"
            " FROM markers WHERE stage = ? GROUP BY source",
            [KEYWORD_FILTER],
        ).fetchall()
    }
    downloaded: dict[str, int] = {}
    if _has_view(con, DOWNLOAD):
        downloaded = dict(
            con.execute(
                f"SELECT _source, count(*) FILTER (status = 'success') FROM \"{DOWNLOAD}\" "
                "GROUP BY _source"
            ).fetchall()
        )
    removed = {
        (stage, source): n
        for stage, source, n in con.execute(
            "SELECT stage, source, count(*) FROM ledger GROUP BY ALL"
        ).fetchall()
    }

    def removed_by(stage: str, source: str) -> int | None:
        return removed.get((stage, source), 0) if (stage, source) in ran else None

    rows = []
    for source in sources:
        amount, after = kw.get(source, (None, None))
        row: dict[str, Any] = {
            "source": source,
            "amount": amount,
            "after_keyword_filter": after,
            "downloaded": downloaded.get(source, 0) if (DOWNLOAD, source) in ran else None,
            # images found unreadable only when sharding count as invalid too
            "invalid_removed": _plus(removed_by(VALIDATE, source), removed.get(("shard", source))),
            "duplicates_removed": removed_by(DEDUP, source),
            "outliers_removed": removed_by(OUTLIERS, source),
        }
        if row["downloaded"] is not None:
            row["remain"] = row["downloaded"] - sum(
                row[c] or 0 for c in ("invalid_removed", "duplicates_removed", "outliers_removed")
            )
        else:
            row["remain"] = after
        rows.append(row)
    if rows:
        total: dict[str, Any] = {"source": "total"}
        for col in STATS_COLUMNS[1:]:
            values = [r[col] for r in rows if r[col] is not None]
            total[col] = sum(values) if values else None
        rows.append(total)
    return rows


def _plus(a: int | None, b: int | None) -> int | None:
    return a if not b else (a or 0) + b


@dataclass
class StageStatus:
    stage: str
    source: str
    done: int
    failed: int
    pending: int
    errors: list[tuple[str, str]]  # (partition, error)


def status(con: duckdb.DuckDBPyConnection, root: DatasetRoot) -> list[StageStatus]:
    """Per stage and source: partitions done, failed (with errors) and pending.

    Pending partitions are those of the last build plan (``builds/latest.json``) that have
    neither a current marker nor a failure.
    """
    plan = root.read_json(root.join("builds", "latest.json")) or {}
    planned: dict[tuple[str, str], set[str]] = {}
    for stage in plan.get("stages", []):
        for part in plan.get("partitions", []):
            planned.setdefault((stage, part["source"]), set()).add(part["name"])
    done: dict[tuple[str, str], set[str]] = {}
    for stage, source, partition in con.execute(
        "SELECT stage, source, partition FROM markers"
    ).fetchall():
        done.setdefault((stage, source), set()).add(partition)
    failed: dict[tuple[str, str], dict[str, str]] = {}
    for stage, source, partition, error in con.execute(
        "SELECT stage, source, partition, error FROM failures ORDER BY partition"
    ).fetchall():
        failed.setdefault((stage, source), {})[partition] = error
    stage_order = {s: i for i, s in enumerate(plan.get("stages", []))}
    keys = sorted(
        set(planned) | set(done) | set(failed),
        key=lambda k: (stage_order.get(k[0], len(stage_order)), k[0], k[1]),
    )
    out = []
    for key in keys:
        f = failed.get(key, {})
        d = done.get(key, set()) - set(f)
        p = planned.get(key, set()) - d - set(f)
        out.append(StageStatus(key[0], key[1], len(d), len(f), len(p), sorted(f.items())))
    return out


def write_plan(root: DatasetRoot, stages: list[str], partitions: list[dict[str, Any]]) -> None:
    """Record what the current build intends to produce (read by :func:`status`)."""
    root.write_json(
        root.join("builds", "latest.json"), {"stages": stages, "partitions": partitions}
    )
