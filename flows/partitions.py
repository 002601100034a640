"""Partitions of a build: one per metadata file of each configured source."""

from __future__ import annotations

import hashlib
import posixpath
import re

from schemas.config import BuildConfig
from storage.stage import Partition

_EXTENSIONS = re.compile(r"(\.(parquet|pq|csv|tsv|txt))?(\.(gz|gzip|zst))?$", re.IGNORECASE)


def partition_name(path: str) -> str:
    """A file-system-safe partition name from a metadata file name."""
    stem = _EXTENSIONS.sub("", posixpath.basename(path.rstrip("/"))) or "part"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)


def discover(config: BuildConfig) -> list[Partition]:
    """Every partition the configured sources hold now, sorted by source then name."""
    parts: list[Partition] = []
    for source in config.sources:
        seen: set[str] = set()
        for path in source.files(config.base_dir):
            name = partition_name(path)
            if name in seen:  # same file name in two folders
                name = f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
            seen.add(name)
            parts.append(Partition(source=source.name, name=name, raw_input=path))
    return sorted(parts, key=lambda p: (p.source, p.name))
