"""Keyword filter: keep web rows whose caption speaks of remote-sensing imagery.

One DuckDB scan per metadata file, streaming (bounded memory whatever the file size): the
source adapter maps the published columns onto the candidates table, the vocabulary in
``tasks/keywords`` decides which rows stay and which keywords they matched.
"""

from __future__ import annotations

import re
from typing import Any

import duckdb
import fsspec
import pyarrow.parquet as pq

from schemas.sources import SourceAdapter, detect_format, get_adapter, relation_sql
from schemas.tables import KEYWORD_FILTER
from storage.stage import Stage, StageContext, StageResult
from tasks.keywords import Vocabulary, load_vocabulary


class BadInputError(ValueError):
    """A metadata file that cannot be read as its source's format."""


def uid_sql(source: str) -> str:
    """DuckDB expression equal to :func:`schemas.tables.sample_uid` (source, url, caption)."""
    src = "'" + source.replace("'", "''") + "'"
    return (
        f"('0x' || md5(concat_ws(chr(31), {src}, coalesce(url, ''), coalesce(caption, '')))"
        "[1:16])::UBIGINT"
    )


class KeywordFilterStage(Stage):
    name = KEYWORD_FILTER
    version = "1"

    def __init__(
        self,
        adapter: str,
        vocabulary: str | None = None,
        max_caption_chars: int = 4096,
        memory_limit: str = "1GB",
        threads: int = 2,
    ):
        self.adapter: SourceAdapter = get_adapter(adapter)
        self.vocab: Vocabulary = load_vocabulary(vocabulary)
        self.max_caption_chars = max_caption_chars
        self.memory_limit = memory_limit
        self.threads = threads

    def params(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter.name,
            "vocabulary": self.vocab.digest,
            "vocabulary_version": self.vocab.version,
            "max_caption_chars": self.max_caption_chars,
        }

    def run(self, ctx: StageContext) -> StageResult:
        path = ctx.partition.raw_input
        assert path is not None, "the keyword filter reads a raw metadata file"
        with duckdb.connect(
            config={
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "memory_limit": self.memory_limit,
                "threads": self.threads,
            }
        ) as con:
            if "://" in path and not path.startswith("file://"):
                con.register_filesystem(fsspec.filesystem(path.split("://", 1)[0]))
            relation = relation_sql(self.adapter, path, detect_format(path))
            present = self._check_columns(con, path, relation)
            rows_in = self._scalar(con, path, f"SELECT count(*) FROM {relation}")
            mapped = self._mapped_sql(ctx, relation, present)
            hits = str(ctx.scratch / "hits.parquet")
            self._execute(
                con,
                path,
                present,
                f"COPY ({self._hits_sql(mapped)}) TO '{hits}' (FORMAT parquet, COMPRESSION zstd)",
            )
            out = str(ctx.scratch / "candidates.parquet")
            con.execute(
                f"COPY (SELECT * EXCLUDE (_drop) FROM read_parquet('{hits}') WHERE _drop IS NULL)"
                f" TO '{out}' (FORMAT parquet, COMPRESSION zstd)"
            )
            removed = con.sql(
                f"SELECT uid, _drop AS reason, json_object('url', url, 'caption_chars', "
                f"length(caption)) AS detail FROM read_parquet('{hits}') WHERE _drop IS NOT NULL"
            ).to_arrow_table()
        return StageResult(
            output=out,
            removed=removed,
            counts={"rows_in": rows_in, **self._null_captions(path)},
        )

    # -- SQL -----------------------------------------------------------------------------------
    def _mapped_sql(self, ctx: StageContext, relation: str, present: dict[str, str]) -> str:
        a = self.adapter
        source = "'" + ctx.source.replace("'", "''") + "'"
        part = "'" + ctx.partition.name.replace("'", "''") + "'"
        extras = "".join(
            f', {_num(c) if c in a.rename else chr(34) + c + chr(34)} AS "{a.kept_name(c)}"'
            for c in a.keep
            if c in present and c not in a.required
        )
        width = (
            f"TRY_CAST({a.width} AS BIGINT)"
            if a.width and _cols_in(a.width, present)
            else "NULL::BIGINT"
        )
        height = (
            f"TRY_CAST({a.height} AS BIGINT)"
            if a.height and _cols_in(a.height, present)
            else "NULL::BIGINT"
        )
        where = f" WHERE {a.filter}" if a.filter and _cols_in(a.filter, present) else ""
        row = ", file_row_number AS _row" if "file_row_number" in present else ", NULL AS _row"
        return (
            f"SELECT {source} AS source, {part} AS partition, ({a.url})::VARCHAR AS url, "
            f"({a.caption})::VARCHAR AS caption, {width} AS width, {height} AS height{extras}"
            f"{row} FROM {relation}{where}"
        )

    def _hits_sql(self, mapped: str) -> str:
        """Rows that match (or are too long to try), then their uid and keywords.

        The filter runs inside the scan; the hits are compacted (ordered by their row in the
        file, which also fixes the output order) before the keyword lists are built, which
        costs far less than building them in the sparse vectors the filter leaves."""
        keep = self.vocab.sql_keep("caption")
        too_long = f"length(caption) > {self.max_caption_chars}"
        matched = self.vocab.sql_matched("caption")
        hits = (
            f"SELECT * FROM ({mapped}) WHERE caption IS NOT NULL AND (CASE WHEN {too_long} "
            f"THEN true ELSE {keep} END) ORDER BY _row"
        )
        return (
            f"SELECT {uid_sql('__SOURCE__')} AS uid, source, partition, url, caption, width, "
            f"height, CASE WHEN {too_long} THEN []::VARCHAR[] ELSE {matched}"
            " END AS keywords, * EXCLUDE (source, partition, url, caption, width, height, _row), "
            f"CASE WHEN {too_long} THEN 'caption_too_long' "
            "WHEN nullif(trim(url), '') IS NULL THEN 'missing_url' END AS _drop "
            f"FROM ({hits})"
        ).replace("'__SOURCE__'", "source")

    def _null_captions(self, path: str) -> dict[str, int]:
        """Null captions of a parquet file, from its statistics (no scan); {} otherwise."""
        if detect_format(path) != "parquet" or self.adapter.caption.count('"') != 2:
            return {}
        column = self.adapter.caption.strip('"')
        try:
            with fsspec.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                idx = meta.schema.to_arrow_schema().get_field_index(column)
                nulls = [
                    meta.row_group(i).column(idx).statistics for i in range(meta.num_row_groups)
                ]
        except Exception:  # statistics are a convenience, never a reason to fail
            return {}
        if idx < 0 or any(s is None or not s.has_null_count for s in nulls):
            return {}
        return {"caption_null": sum(s.null_count for s in nulls)}

    # -- errors that name the file and the column ----------------------------------------------
    def _check_columns(
        self, con: duckdb.DuckDBPyConnection, path: str, relation: str
    ) -> dict[str, str]:
        try:
            described = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()
        except duckdb.Error as exc:
            raise BadInputError(
                f"{path}: cannot be read as {self.adapter.title} metadata: {_first_line(exc)}"
            ) from None
        present = {row[0]: row[1] for row in described}
        for column in self.adapter.required:
            if column not in present:
                raise BadInputError(
                    f"{path}: column {column!r} is missing ({self.adapter.title} needs "
                    f"{', '.join(self.adapter.required)}; "
                    f"the file has {', '.join(present) or 'no columns'})"
                )
        for column in self.adapter.string_columns:
            if present[column] != "VARCHAR":
                raise BadInputError(
                    f"{path}: column {column!r} has type {present[column]}, expected text (VARCHAR)"
                )
        return present

    def _scalar(self, con: duckdb.DuckDBPyConnection, path: str, sql: str) -> int:
        return self._execute(con, path, None, sql).fetchone()[0]

    def _execute(
        self, con: duckdb.DuckDBPyConnection, path: str, present: dict[str, str] | None, sql: str
    ) -> duckdb.DuckDBPyConnection:
        try:
            return con.execute(sql)
        except duckdb.Error as exc:
            column = self._culprit(con, path) if present is not None else None
            where = f" (column {column!r})" if column else ""
            raise BadInputError(f"{path}{where}: {_first_line(exc)}") from None

    def _culprit(self, con: duckdb.DuckDBPyConnection, path: str) -> str | None:
        """Find which required column a read error comes from, by reading each alone."""
        relation = relation_sql(self.adapter, path, detect_format(path))
        for column in self.adapter.required:
            try:
                con.execute(f'SELECT max(length("{column}")) FROM {relation}').fetchone()
            except duckdb.Error:
                return column
        return None


def _num(column: str) -> str:
    """A coordinate column as DOUBLE (text files publish them as text)."""
    return f'TRY_CAST("{column}" AS DOUBLE)'


def _cols_in(expr: str, present: dict[str, str]) -> bool:
    """Whether every quoted column an expression names exists in the file."""
    return all(c in present for c in re.findall(r'"([^"]+)"', expr))


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
