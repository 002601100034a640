"""Fingerprints: what a stage's output depends on, hashed, so unchanged work is skipped."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import duckdb
import fsspec


def fingerprint(stage: str, version: str, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """Hash of the stage name, its version, its parameters and its inputs' digests."""
    payload = {"stage": stage, "version": version, "params": params, "inputs": inputs}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_digest(url: str) -> str:
    """Digest of a raw input file (any fsspec URL) from its path, size and modification time,
    without reading it."""
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
    return fingerprint("file", "1", {"path": path, "size": info.get("size")}, {"mtime": str(stamp)})


def table_digest(con: duckdb.DuckDBPyConnection, parquet_path: str) -> str:
    """Order-insensitive digest of a parquet file's rows.

    Downstream fingerprints use it instead of the upstream fingerprint, so a rerun that produces
    the same rows (say, a keyword added that matches nothing new) does not cascade.
    """
    count, xor, total = con.execute(
        "SELECT count(*), bit_xor(hash(t)), sum(hash(t)::HUGEINT) FROM read_parquet(?) t",
        [parquet_path],
    ).fetchone()
    return hashlib.sha256(f"{count}:{xor}:{total}".encode()).hexdigest()
