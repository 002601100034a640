"""The dataset root: every stage's files under one fsspec location (a local folder by default)."""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

STAGES_DIR = "stages"
LEDGER_DIR = "ledger"


class DatasetRoot:
    """A dataset root on any fsspec filesystem.

    Layout (all paths relative to the root)::

        stages/<stage>/<source>/<partition>.parquet      the stage's output table
        stages/<stage>/<source>/<partition>.done.json    commit marker (fingerprint, counts)
        stages/<stage>/<source>/<partition>.failed.json  the last failure of that partition
        stages/<stage>/<source>/<partition>/             side files (image tar shards, ...)
        ledger/<stage>/<source>/<partition>.parquet      samples the stage removed, with reasons
        catalog.duckdb                                   DuckDB views over the files (disposable)
    """

    def __init__(self, url: str | os.PathLike[str]):
        url = str(url)
        self.fs, path = fsspec.core.url_to_fs(url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            path = str(Path(path).resolve())
        self.path = path.rstrip("/") or "/"
        self.url = url if not self.is_local else self.path
        self.fs.makedirs(self.path, exist_ok=True)

    def __repr__(self) -> str:
        return f"DatasetRoot({self.url!r})"

    # -- paths ---------------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def stage_dir(self, stage: str, source: str | None = None) -> str:
        return self.join(STAGES_DIR, stage, *([source] if source else []))

    def output_path(self, stage: str, source: str, partition: str) -> str:
        return self.join(STAGES_DIR, stage, source, f"{partition}.parquet")

    def marker_path(self, stage: str, source: str, partition: str) -> str:
        return self.join(STAGES_DIR, stage, source, f"{partition}.done.json")

    def failure_path(self, stage: str, source: str, partition: str) -> str:
        return self.join(STAGES_DIR, stage, source, f"{partition}.failed.json")

    def side_dir(self, stage: str, source: str, partition: str) -> str:
        return self.join(STAGES_DIR, stage, source, partition)

    def ledger_path(self, stage: str, source: str, partition: str) -> str:
        return self.join(LEDGER_DIR, stage, source, f"{partition}.parquet")

    def query_url(self, path: str) -> str:
        """A path as DuckDB should read it (a plain path locally, the protocol URL elsewhere)."""
        if self.is_local:
            return path
        protocol = self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol
        return f"{protocol}://{path}"

    # -- reading -------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_json(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(path, "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # a torn marker counts as no marker

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    def glob(self, pattern: str) -> list[str]:
        return sorted(self.fs.glob(self.join(pattern)))

    # -- atomic writing ------------------------------------------------------------------------
    @contextmanager
    def atomic_path(self, path: str) -> Iterator[str]:
        """Yield a temporary path beside ``path``; it is renamed onto ``path`` only on success.

        A writer killed half-way leaves a ``.tmp-*`` file that no reader looks at and that the
        next commit of the same partition removes.
        """
        parent = posixpath.dirname(path)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            yield tmp
            if self.is_local:
                os.replace(tmp, path)
            else:
                self.fs.mv(tmp, path)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.atomic_path(path) as tmp, self.fs.open(tmp, "wb") as f:
            f.write(data)
            if self.is_local:
                f.flush()
                os.fsync(f.fileno())

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def write_table(self, path: str, table: pa.Table) -> None:
        with self.atomic_path(path) as tmp, self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")

    def put_file(self, local_path: str, path: str) -> None:
        """Move a finished local file into the root atomically."""
        with self.atomic_path(path) as tmp:
            if self.is_local:
                os.replace(local_path, tmp)
            else:
                self.fs.put_file(local_path, tmp)

    def remove(self, path: str, recursive: bool = False) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=recursive)

    def remove_stale_temporaries(self, directory: str, prefix: str) -> None:
        """Delete ``<prefix>*.tmp-*`` files left in ``directory`` by killed writers (only the
        caller's own: other partitions may be writing beside them)."""
        if not self.fs.exists(directory):
            return
        for path in self.fs.ls(directory, detail=False):
            name = posixpath.basename(path)
            if name.startswith(prefix) and ".tmp-" in name:
                self.fs.rm(path, recursive=True)
