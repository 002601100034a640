"""The shard step: kept samples -> ``{branch}-{split}-NNNN.tar`` webdataset shards + manifest.

Global (not per partition). Two halves:

* :func:`collect_samples` walks every committed partition, takes the final kept set (the last
  stage of ``validate -> dedup -> outliers`` that committed the partition, up to ``kept_from``),
  and joins caption, image reference, scores, places and metadata into one row per sample.
* :func:`write_shards` turns those rows into tars. Each sample is ``<key>.<jpg|png|webp>`` (the
  bytes as downloaded, never re-encoded), ``<key>.json`` and ``<key>.txt``; ``key`` is the uid as
  16 hex digits. Tars are byte-identical for the same inputs: samples sorted by (split, uid),
  members sorted, fixed header fields (mtime 0, uid/gid 0, empty owner names, mode 0644, ustar).
  Each tar is written under a temporary name and renamed; the manifest is written last.

Layout under ``<root>/<config.shard_dir>`` (``shards`` by default)::

    pub11-train-0000.tar ...      the shards
    manifest.parquet              shard, branch, split, index, samples, bytes, sha256
    manifest.json                 the same + the config and totals (written last)
    samples.parquet               schemas.tables.SAMPLES, one row per sample in a shard
    sizes.json                    {tar name: samples}: open_clip's trainer reads it

Samples that cannot be written (unreadable or missing tar member, checksum mismatch, ...) are
skipped and recorded in the ledger ``ledger/shard/_all/shards.parquet``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import posixpath
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from typing import Any, BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from schemas.shard_config import ShardConfig
from schemas.tables import (
    DEDUP,
    DOWNLOAD,
    GEOTAG,
    KEYWORD_FILTER,
    LEDGER,
    OUTLIERS,
    SAMPLES,
    VALIDATE,
)
from storage.root import DatasetRoot

log = logging.getLogger(__name__)

SHARD_STAGE = "shard"
CAPTION_STAGE = "caption"  # the RS3 captioning stage (final caption per image)
KEPT_CHAIN: tuple[str, ...] = (VALIDATE, DEDUP, OUTLIERS)
LEDGER_SOURCE = "_all"
LEDGER_PARTITION = "shards"
MANIFEST_FORMAT = 1

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("branch", pa.string()),
        pa.field("split", pa.string()),
        pa.field("index", pa.int32()),
        pa.field("samples", pa.int64()),
        pa.field("bytes", pa.int64()),
        pa.field("sha256", pa.string()),
    ]
)

# One row per sample to shard, as collect_samples returns them (per branch).
SHARD_INPUT = pa.schema(
    [
        pa.field("uid", pa.uint64(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("partition", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("tar", pa.string()),  # image in a tar: path relative to the root (or absolute)
        pa.field("member", pa.string()),  # member name in that tar (or just the key)
        pa.field("path", pa.string()),  # or a loose image file (fsspec URL / abs / root-relative)
        pa.field("sha256", pa.string()),  # of the image bytes, when known
        pa.field("info", pa.string()),  # JSON {"places", "scores", "metadata"}
    ]
)

IMAGE_EXTS = ("jpg", "png", "webp")
_FORMAT_EXT = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
_SHARD_NAME = re.compile(r"^(?P<branch>.+)-(?P<split>train|val)-(?P<index>\d+)\.tar$")
_CAPTION_COLUMNS = ("caption", "final_caption", "text")
_TAR_COLUMNS = ("tar", "tar_path", "shard", "image_tar")
_KEY_COLUMNS = ("key", "image_key")
_FORMAT_COLUMNS = ("format", "image_format", "ext", "extension")
_PATH_COLUMNS = ("image_path", "path", "file", "image")
_GEO_COLUMNS = ("lat", "lon", "utm_zone", "country_code")
_NOT_SCORES = {"uid", "keep", "reason", "duplicate_of", "source", "partition", "detail"}
_NOT_META = {"uid", "source", "partition", "caption"}


# -- manifest --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    """One tar of the manifest."""

    shard: str  # file name, e.g. "pub11-train-0003.tar"
    branch: str
    split: str
    index: int
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """Every shard of the build, plus what this run did."""

    shards: list[ShardInfo]
    directory: str  # the shard folder: a local path, or a protocol URL (s3://...) elsewhere
    config: dict[str, Any] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)  # tars written by this run
    skipped: int = 0  # samples this run sent to the ledger instead of a shard
    stale: int = 0  # samples in existing shards that are no longer kept (reshard drops them)

    def select(self, branch: str | None = None, split: str | None = None) -> list[ShardInfo]:
        return [
            s
            for s in self.shards
            if (branch is None or s.branch == branch) and (split is None or s.split == split)
        ]

    def total(self, branch: str | None = None, split: str | None = None) -> int:
        return sum(s.samples for s in self.select(branch, split))

    def urls(self, branch: str | None = None, split: str | None = None) -> list[str]:
        """Full paths of the selected tars, in manifest order."""
        return [posixpath.join(self.directory, s.shard) for s in self.select(branch, split)]

    def brace_url(self, branch: str, split: str) -> str:
        """One ``{0000..0012}`` pattern (open_clip's ``--train-data``); indexes are contiguous."""
        sel = self.select(branch, split)
        if not sel:
            raise ValueError(f"no {branch}-{split} shards")
        idx = sorted(s.index for s in sel)
        if idx != list(range(idx[0], idx[-1] + 1)):
            return "::".join(self.urls(branch, split))
        width = len(sel[0].shard.rsplit("-", 1)[1]) - len(".tar")
        lo, hi = f"{idx[0]:0{width}d}", f"{idx[-1]:0{width}d}"
        name = f"{branch}-{split}-{lo}.tar" if lo == hi else f"{branch}-{split}-{{{lo}..{hi}}}.tar"
        return posixpath.join(self.directory, name)

    def to_table(self) -> pa.Table:
        return pa.Table.from_pylist([asdict(s) for s in self.shards], schema=MANIFEST_SCHEMA)

    def to_json(self) -> dict[str, Any]:
        totals: dict[str, int] = {}
        for s in self.shards:
            totals[f"{s.branch}-{s.split}"] = totals.get(f"{s.branch}-{s.split}", 0) + s.samples
        return {
            "format": MANIFEST_FORMAT,
            "config": self.config,
            "samples": self.total(),
            "totals": dict(sorted(totals.items())),
            "shards": [asdict(s) for s in self.shards],
        }


def shard_dir(root: DatasetRoot, config: ShardConfig | None = None) -> str:
    return root.join((config or ShardConfig()).shard_dir)


def read_manifest(root: DatasetRoot, config: ShardConfig | None = None) -> Manifest | None:
    """The committed manifest, or None when no shard build has finished yet."""
    directory = shard_dir(root, config)
    doc = root.read_json(posixpath.join(directory, "manifest.json"))
    if doc is None:
        return None
    shards = [ShardInfo(**s) for s in doc.get("shards", [])]
    return Manifest(
        shards=shards, directory=root.query_url(directory), config=doc.get("config", {})
    )


# -- collecting the kept samples ---------------------------------------------------------------
@dataclass
class Collected:
    """What :func:`collect_samples` found: rows per branch, and samples it had to drop."""

    by_branch: dict[str, pa.Table]
    removed: pa.Table  # schemas.tables.LEDGER rows (stage "shard")
    kept_stage: dict[str, str] = field(default_factory=dict)  # "source/partition" -> stage used


def _committed(root: DatasetRoot, stage: str, source: str, partition: str) -> bool:
    return root.exists(root.marker_path(stage, source, partition)) and root.exists(
        root.output_path(stage, source, partition)
    )


def _read(root: DatasetRoot, stage: str, source: str, partition: str) -> pa.Table | None:
    if not _committed(root, stage, source, partition):
        return None
    return root.read_table(root.output_path(stage, source, partition))


def _partitions(root: DatasetRoot, stages: Iterable[str]) -> list[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for stage in stages:
        for marker in root.glob(f"stages/{stage}/*/*.done.json"):
            source = posixpath.basename(posixpath.dirname(marker))
            found.add((source, posixpath.basename(marker)[: -len(".done.json")]))
    return sorted(found)


def _first(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _clean(value: Any) -> Any:
    """A JSON-safe value: NaN/inf become null, bytes are dropped, containers recurse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items() if not isinstance(v, bytes)}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, bytes):
        return None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def _rows_by_uid(table: pa.Table | None, uids: pa.Array) -> dict[int, dict[str, Any]]:
    if table is None or "uid" not in table.column_names:
        return {}
    table = table.filter(pc.is_in(table.column("uid").cast(pa.uint64()), value_set=uids))
    return {int(r["uid"]): r for r in table.to_pylist()}


def _kept_uids(table: pa.Table) -> pa.Array:
    if "keep" in table.column_names:
        table = table.filter(pc.fill_null(table.column("keep"), False))
    return pc.unique(table.column("uid").cast(pa.uint64()))


def collect_samples(
    root: DatasetRoot,
    branches: Mapping[str, str],
    *,
    kept_from: str = OUTLIERS,
    chain_stages: Sequence[str] = KEPT_CHAIN,
    caption_from: Sequence[str] = (CAPTION_STAGE, KEYWORD_FILTER),
    image_from: Sequence[str] = (VALIDATE, DOWNLOAD),
    fallback: bool = True,
) -> Collected:
    """The final kept samples of every committed partition, grouped by branch.

    ``branches`` maps each source to its branch ("pub11" or "rs3"); a committed source missing
    from it is an error (nothing disappears silently). The kept set of a partition comes from the
    last stage of ``chain_stages`` (up to and including ``kept_from``) that committed it; with
    ``fallback=False`` a partition whose ``kept_from`` stage has not committed is left out (and
    logged) instead of falling back to an earlier stage.
    """
    if kept_from not in chain_stages:
        raise ValueError(f"kept_from={kept_from!r} is not one of {tuple(chain_stages)}")
    usable = tuple(chain_stages[: chain_stages.index(kept_from) + 1])
    parts = _partitions(root, usable)
    unknown = sorted({s for s, _ in parts} - set(branches))
    if unknown:
        raise ValueError(f"sources without a branch: {unknown}; pass them in `branches`")

    tables: dict[str, list[pa.Table]] = {}
    removed: list[dict[str, Any]] = []
    kept_stage: dict[str, str] = {}
    for source, partition in parts:
        stage = next((s for s in reversed(usable) if _committed(root, s, source, partition)), None)
        if stage is None:
            continue
        if stage != kept_from and not fallback:
            log.warning("%s/%s: %s has not committed; left out", source, partition, kept_from)
            continue
        kept_stage[f"{source}/{partition}"] = stage
        table, dropped = _collect_partition(
            root, source, partition, stage, caption_from, image_from
        )
        removed.extend(dropped)
        tables.setdefault(branches[source], []).append(table)

    by_branch = {
        b: pa.concat_tables(ts).cast(SHARD_INPUT) if ts else SHARD_INPUT.empty_table()
        for b, ts in sorted(tables.items())
    }
    return Collected(by_branch, _ledger(removed), kept_stage)


def _collect_partition(
    root: DatasetRoot,
    source: str,
    partition: str,
    kept_stage: str,
    caption_from: Sequence[str],
    image_from: Sequence[str],
) -> tuple[pa.Table, list[dict[str, Any]]]:
    uids = _kept_uids(_read(root, kept_stage, source, partition))

    def rows(stage: str) -> dict[int, dict[str, Any]]:
        return _rows_by_uid(_read(root, stage, source, partition), uids)

    captions: dict[int, str | None] = {}
    candidates: dict[int, dict[str, Any]] = {}
    for stage in caption_from:
        found = rows(stage)
        if stage == KEYWORD_FILTER:
            candidates = found
        col = _first(next(iter(found.values()), {}).keys(), _CAPTION_COLUMNS) if found else None
        if col and not captions:
            captions = {u: r.get(col) for u, r in found.items()}
    if not candidates and KEYWORD_FILTER not in caption_from:
        candidates = rows(KEYWORD_FILTER)

    images: dict[int, dict[str, Any]] = {}
    for stage in image_from:
        images = rows(stage)
        if images:
            break
    downloads = rows(DOWNLOAD) if VALIDATE in image_from else {}
    scores: dict[int, dict[str, Any]] = {}
    for stage in (DEDUP, OUTLIERS):
        for u, r in rows(stage).items():
            scores.setdefault(u, {}).update({k: v for k, v in r.items() if k not in _NOT_SCORES})
    geo = rows(GEOTAG)

    out: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    for uid in sorted(int(u) for u in uids.to_pylist()):
        img = images.get(uid)
        caption = captions.get(uid)
        base = {"uid": uid, "source": source, "partition": partition}
        if img is None:
            dropped.append({**base, "reason": "missing_image_ref", "detail": None})
            continue
        if caption is None or not str(caption).strip():
            dropped.append({**base, "reason": "missing_caption", "detail": None})
            continue
        cols = list(img)
        tar_col, key_col = _first(cols, _TAR_COLUMNS), _first(cols, _KEY_COLUMNS)
        fmt_col, path_col = _first(cols, _FORMAT_COLUMNS), _first(cols, _PATH_COLUMNS)
        tar = img.get(tar_col) if tar_col else None
        member = None
        if tar and img.get("member"):  # the validate stage's exact member name
            member = str(img["member"])
        elif tar and key_col and img.get(key_col):
            member = str(img[key_col])
            fmt = str(img.get(fmt_col) or "").lower().lstrip(".") if fmt_col else ""
            if fmt and "." not in posixpath.basename(member):
                member = f"{member}.{_FORMAT_EXT.get(fmt, fmt)}"
        path = img.get(path_col) if path_col and not member else None
        if not member and not path:
            dropped.append({**base, "reason": "missing_image_ref", "detail": None})
            continue
        sha = img.get("sha256")
        dl = downloads.get(uid, {})
        if sha is None and "sha256" not in img and dl.get("tar") == tar:  # same bytes
            sha = dl.get("sha256")

        meta = {k: v for k, v in candidates.get(uid, {}).items() if k not in _NOT_META}
        for k in ("width", "height"):
            if img.get(k) is not None:
                meta[k] = img[k]
        if fmt_col and img.get(fmt_col) is not None:
            meta["format"] = img[fmt_col]
        g = geo.get(uid, {})
        for k in _GEO_COLUMNS:
            if k in g:
                meta[k] = g[k]
        info = {
            "places": _clean(g.get("places") or []),
            "scores": _clean(scores.get(uid, {})),
            "metadata": _clean(meta),
        }
        out.append(
            {
                **base,
                "caption": str(caption),
                "tar": tar if member else None,
                "member": member,
                "path": path,
                "sha256": sha,
                "info": json.dumps(info, sort_keys=True, separators=(",", ":")),
            }
        )
    return pa.Table.from_pylist(out, schema=SHARD_INPUT), dropped


def _ledger(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "uid": r["uid"],
                "source": r["source"],
                "partition": r["partition"],
                "stage": SHARD_STAGE,
                "reason": r["reason"],
                "detail": r.get("detail"),
            }
            for r in rows
        ],
        schema=LEDGER,
    )


# -- reading the image bytes -------------------------------------------------------------------
class SkipSample(Exception):
    """A sample that cannot go into a shard; ``reason`` goes to the ledger."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def sniff_ext(data: bytes) -> str | None:
    """The webdataset extension of image bytes, from their magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


@dataclass
class _TarIndex:
    members: dict[str, tuple[int, int]]  # name -> (data offset, size)
    by_key: dict[str, list[str]]
    error: str | None  # set when the tar could not be read to its end


class _ImageReader:
    """Random access to members of the download tars: one header scan per tar, then seeks."""

    def __init__(self, root: DatasetRoot, max_open: int = 16):
        self.root = root
        self.max_open = max_open
        self._index: dict[str, _TarIndex] = {}
        self._open: OrderedDict[str, BinaryIO] = OrderedDict()

    def _path(self, tar: str) -> str:
        if "://" in tar or tar.startswith(self.root.path + "/"):
            return tar
        return self.root.join(tar.lstrip("/")) if not tar.startswith("/") else tar

    def _handle(self, path: str) -> BinaryIO:
        f = self._open.pop(path, None)
        if f is None:
            f = self.root.fs.open(path, "rb")
            if len(self._open) >= self.max_open:
                _, old = self._open.popitem(last=False)
                old.close()
        self._open[path] = f
        return f

    def _scan(self, path: str) -> _TarIndex:
        idx = self._index.get(path)
        if idx is not None:
            return idx
        members: dict[str, tuple[int, int]] = {}
        error = None
        try:
            f = self._handle(path)
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as tf:
                while True:
                    try:
                        m = tf.next()
                    except (tarfile.TarError, EOFError, OSError) as exc:
                        error = f"{type(exc).__name__}: {exc}"
                        break
                    if m is None:
                        break
                    if m.isfile():
                        members[m.name] = (m.offset_data, m.size)
        except FileNotFoundError as exc:
            error = f"FileNotFoundError: {exc}"
        except (tarfile.TarError, EOFError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        by_key: dict[str, list[str]] = {}
        for name in members:
            base = posixpath.basename(name)
            by_key.setdefault(name[: len(name) - len(base)] + base.split(".", 1)[0], []).append(
                name
            )
        idx = _TarIndex(members, by_key, error)
        self._index[path] = idx
        return idx

    def read_member(self, tar: str, member: str) -> bytes:
        path = self._path(tar)
        idx = self._scan(path)
        name = member
        if name not in idx.members:
            key = member.rsplit(".", 1)[0] if "." in posixpath.basename(member) else member
            alts = [n for n in idx.by_key.get(key, []) if n.rsplit(".", 1)[-1] in _FORMAT_EXT]
            if not alts:
                if idx.error is not None:
                    raise SkipSample("unreadable_member", f"{tar}:{member}: {idx.error}")
                raise SkipSample("missing_member", f"{tar}:{member}")
            name = sorted(alts)[0]
        offset, size = idx.members[name]
        try:
            f = self._handle(path)
            f.seek(offset)
            data = f.read(size)
        except OSError as exc:
            raise SkipSample("unreadable_member", f"{tar}:{name}: {exc}") from exc
        if len(data) != size:
            raise SkipSample(
                "unreadable_member", f"{tar}:{name}: truncated ({len(data)} of {size} bytes)"
            )
        return data

    def read_path(self, path: str) -> bytes:
        try:
            if "://" in path:
                with fsspec.open(path, "rb") as f:
                    return f.read()
            full = path if path.startswith("/") else self.root.join(path)
            with self.root.fs.open(full, "rb") as f:
                return f.read()
        except (OSError, ValueError) as exc:
            raise SkipSample("unreadable_file", f"{path}: {exc}") from exc

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def _check_image(data: bytes, sha256: str | None, config: ShardConfig) -> str:
    if not data:
        raise SkipSample("unreadable_member", "empty member")
    if config.check_sha256 and sha256:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256.lower():
            raise SkipSample("checksum_mismatch", f"expected {sha256}, got {got}")
    ext = sniff_ext(data)
    if ext is None:
        raise SkipSample("unsupported_format", f"magic {data[:12].hex()}")
    if config.check_image_header:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width <= 0 or im.height <= 0:
                    raise ValueError("empty image")
        except Exception as exc:  # PIL raises many types for broken headers
            raise SkipSample("undecodable_image", f"{type(exc).__name__}: {exc}") from exc
    return ext


# -- writing the tars --------------------------------------------------------------------------
class _HashingWriter:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    tar.addfile(ti, io.BytesIO(data))


def split_of(uid: int, val_ratio: float, salt: str) -> str:
    """``"val"`` or ``"train"``: a uniform hash of the uid under ``salt`` against ``val_ratio``."""
    if val_ratio <= 0.0:
        return "train"
    digest = hashlib.sha256(f"{salt}\x1f{uid:016x}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_ratio * 2.0**64 else "train"


def uid_key(uid: int) -> str:
    return f"{uid:016x}"


def shard_name(branch: str, split: str, index: int, digits: int = 4) -> str:
    return f"{branch}-{split}-{index:0{digits}d}.tar"


def write_shards(
    root: DatasetRoot,
    samples_by_branch: Mapping[str, pa.Table],
    config: ShardConfig | None = None,
    *,
    reshard: bool = False,
    removed: pa.Table | None = None,
) -> Manifest:
    """Write the samples of every branch into tars and commit the manifest.

    ``samples_by_branch`` holds tables with the :data:`SHARD_INPUT` columns (what
    :func:`collect_samples` returns). Incremental by default: shards already in the manifest are
    kept and only samples that are in none of them go into new shards, numbered after the last
    index of their branch and split. ``reshard=True`` rewrites everything from index 0.
    ``removed`` (LEDGER rows found while collecting) is added to the shard ledger.
    """
    config = config or ShardConfig()
    directory = shard_dir(root, config)
    root.fs.makedirs(directory, exist_ok=True)
    root.remove_stale_temporaries(directory, "")  # the shard step is the only writer here
    samples_path = posixpath.join(directory, "samples.parquet")

    old = None if reshard else read_manifest(root, config)
    old_shards: list[ShardInfo] = []
    old_samples = SAMPLES.empty_table()
    if old is not None:
        for k in ("val_ratio", "split_salt"):
            if k in old.config and old.config[k] != getattr(config, k):
                raise ValueError(
                    f"{k} changed ({old.config[k]!r} -> {getattr(config, k)!r}): existing samples "
                    "would change split; rebuild with reshard=True"
                )
        for s in old.shards:  # a listed tar that is gone: its samples are written again
            path = posixpath.join(directory, s.shard)
            if root.exists(path) and root.fs.size(path) == s.bytes:
                old_shards.append(s)
            else:
                log.warning("%s is missing or changed; its samples go into new shards", s.shard)
        if root.exists(samples_path):
            old_samples = root.read_table(samples_path).cast(SAMPLES)
            kept_names = pa.array([s.shard for s in old_shards], pa.string())
            old_samples = old_samples.filter(pc.is_in(old_samples.column("shard"), kept_names))

    done = {int(u) for u in old_samples.column("uid").to_pylist()}
    next_index: dict[tuple[str, str], int] = {}
    for s in old_shards:
        next_index[(s.branch, s.split)] = max(next_index.get((s.branch, s.split), 0), s.index + 1)

    reader = _ImageReader(root)
    ledger_rows: list[dict[str, Any]] = []
    new_shards: list[ShardInfo] = []
    new_sample_rows: list[dict[str, Any]] = []
    kept_now: set[int] = set()
    try:
        for branch in sorted(samples_by_branch):
            rows = _prepare(samples_by_branch[branch], config, done, kept_now, ledger_rows)
            for split in ("train", "val"):
                todo = [r for r in rows if r["split"] == split]
                if not todo:
                    continue
                ready = _ready(todo, reader, config, ledger_rows)
                index = next_index.get((branch, split), 0)
                for info, sample_rows in _write_group(
                    root, directory, branch, split, index, ready, config
                ):
                    new_shards.append(info)
                    new_sample_rows.extend(sample_rows)
    finally:
        reader.close()

    stale = len(done - kept_now) if samples_by_branch else 0
    if stale:
        log.warning("%d sharded samples are no longer kept; rebuild with reshard=True", stale)

    shards = sorted(old_shards + new_shards, key=lambda s: (s.branch, s.split, s.index))
    samples = pa.concat_tables([old_samples, pa.Table.from_pylist(new_sample_rows, schema=SAMPLES)])
    if samples.num_rows:
        samples = samples.sort_by([("shard", "ascending"), ("key", "ascending")])
    ledger = _ledger(ledger_rows)
    if removed is not None and removed.num_rows:
        ledger = pa.concat_tables([removed.cast(LEDGER), ledger])

    manifest = Manifest(
        shards=shards,
        directory=root.query_url(directory),
        config=config.model_dump(mode="json"),
        written=[s.shard for s in new_shards],
        skipped=ledger.num_rows,
        stale=stale,
    )
    root.write_table(root.ledger_path(SHARD_STAGE, LEDGER_SOURCE, LEDGER_PARTITION), ledger)
    root.write_table(samples_path, samples)
    root.write_json(posixpath.join(directory, "sizes.json"), {s.shard: s.samples for s in shards})
    root.write_bytes(
        posixpath.join(directory, "README.md"), _dataset_card(shards, samples).encode("utf-8")
    )
    root.write_table(posixpath.join(directory, "manifest.parquet"), manifest.to_table())
    root.write_json(posixpath.join(directory, "manifest.json"), manifest.to_json())  # last

    listed = {s.shard for s in shards}
    for path in root.glob(f"{config.shard_dir}/*.tar"):  # leftovers of killed or older builds
        if posixpath.basename(path) not in listed and _SHARD_NAME.match(posixpath.basename(path)):
            root.remove(path)
    log.info(
        "shards: %d written, %d total, %d samples, %d skipped",
        len(new_shards),
        len(shards),
        manifest.total(),
        ledger.num_rows,
    )
    return manifest


def _prepare(
    table: pa.Table,
    config: ShardConfig,
    done: set[int],
    kept_now: set[int],
    ledger_rows: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """New samples of one branch with their split, sorted by (split, uid); duplicates dropped."""
    seen: set[int] = set()
    out: list[dict[str, Any]] = []
    rows = table.cast(SHARD_INPUT).to_pylist()
    rows.sort(key=lambda r: (r["uid"], r["source"] or "", r["partition"] or ""))
    for r in rows:
        uid = int(r["uid"])
        if uid in seen or uid in kept_now:
            ledger_rows.append({**r, "reason": "duplicate_uid", "detail": None})
            continue
        seen.add(uid)
        kept_now.add(uid)
        if uid in done:
            continue
        r["split"] = split_of(uid, config.val_ratio, config.split_salt)
        out.append(r)
    out.sort(key=lambda r: (r["split"], r["uid"]))
    return out


def _ready(
    rows: list[dict[str, Any]],
    reader: _ImageReader,
    config: ShardConfig,
    ledger_rows: list[dict[str, Any]],
) -> Iterator[tuple[dict[str, Any], dict[str, bytes]]]:
    """(row, {member name: bytes}) for each sample whose image could be read and checked."""
    for r in rows:
        key = uid_key(int(r["uid"]))
        try:
            if r["member"]:
                data = reader.read_member(r["tar"] or "", r["member"])
            elif r["path"]:
                data = reader.read_path(r["path"])
            else:
                raise SkipSample("missing_image_ref")
            ext = _check_image(data, r["sha256"], config)
        except SkipSample as skip:
            ledger_rows.append({**r, "reason": skip.reason, "detail": skip.detail})
            continue
        doc = {"uid": key, "source": r["source"], "split": r["split"], **json.loads(r["info"])}
        meta = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        r["metadata"] = meta
        yield (
            r,
            {
                f"{key}.{ext}": data,
                f"{key}.json": meta.encode("utf-8"),
                f"{key}.txt": r["caption"].encode("utf-8"),
            },
        )


def _write_group(
    root: DatasetRoot,
    directory: str,
    branch: str,
    split: str,
    index: int,
    ready: Iterator[tuple[dict[str, Any], dict[str, bytes]]],
    config: ShardConfig,
) -> Iterator[tuple[ShardInfo, list[dict[str, Any]]]]:
    it = iter(ready)
    while True:
        first = next(it, None)
        if first is None:
            return
        name = shard_name(branch, split, index, config.index_digits)
        sample_rows: list[dict[str, Any]] = []
        with (
            root.atomic_path(posixpath.join(directory, name)) as tmp,
            root.fs.open(tmp, "wb") as raw,
        ):
            out = _HashingWriter(raw)
            with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for r, members in chain([first], islice(it, config.samples_per_shard - 1)):
                    for member in sorted(members):
                        _add_member(tar, member, members[member])
                    sample_rows.append(
                        {
                            "uid": r["uid"],
                            "source": r["source"],
                            "split": split,
                            "shard": name,
                            "key": uid_key(int(r["uid"])),
                            "caption": r["caption"],
                            "metadata": r["metadata"],
                        }
                    )
        info = ShardInfo(
            name, branch, split, index, len(sample_rows), out.size, out.sha.hexdigest()
        )
        yield info, sample_rows
        index += 1


# -- Hugging Face dataset card -----------------------------------------------------------------
_HF_DTYPES = {
    pa.string(): "string",
    pa.large_string(): "string",
    pa.bool_(): "bool",
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.uint8(): "uint8",
    pa.uint16(): "uint16",
    pa.uint32(): "uint32",
    pa.uint64(): "uint64",
    pa.float16(): "float16",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.null(): "null",
}


def _hf_value(t: pa.DataType) -> Any:
    if pa.types.is_struct(t):
        return [_hf_field(t.field(i).name, t.field(i).type) for i in _sorted_fields(t)]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return {"list": _hf_value(t.value_type)}
    return _HF_DTYPES.get(t, "string")


def _hf_field(name: str, t: pa.DataType) -> dict[str, Any]:
    if pa.types.is_struct(t):
        return {"name": name, "struct": _hf_value(t)}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return {"name": name, "list": _hf_value(t.value_type)}
    return {"name": name, "dtype": _HF_DTYPES.get(t, "string")}


def _sorted_fields(t: pa.DataType) -> list[int]:
    return sorted(range(t.num_fields), key=lambda i: t.field(i).name)


def _json_type(docs: pa.ChunkedArray | pa.Array, batch: int = 50_000) -> pa.DataType:
    """The union Arrow type of JSON documents (keys merged, int promoted to float, ...)."""
    schema = pa.schema([("j", pa.struct([]))])
    values = docs.to_pylist()
    for start in range(0, len(values), batch):
        arr = pa.array([json.loads(v) for v in values[start : start + batch] if v])
        schema = pa.unify_schemas(
            [schema, pa.schema([("j", arr.type)])], promote_options="permissive"
        )
    return schema.field("j").type


def _dataset_card(shards: list[ShardInfo], samples: pa.Table) -> str:
    """A Hugging Face dataset card (README.md) whose YAML header declares one config per branch
    with its splits and explicit features: every image extension as an Image column and the
    union type of the .json documents. Without it, ``datasets`` infers the features from the
    first five samples of the first tar and silently drops other image types and JSON keys."""
    configs, infos = [], []
    for branch in sorted({s.branch for s in shards}):
        names = pa.array([s.shard for s in shards if s.branch == branch], pa.string())
        docs = samples.filter(pc.is_in(samples.column("shard"), names)).column("metadata")
        splits = sorted({s.split for s in shards if s.branch == branch}, reverse=True)
        configs.append(
            {
                "config_name": branch,
                "data_files": [
                    {"split": "validation" if sp == "val" else sp, "path": f"{branch}-{sp}-*.tar"}
                    for sp in splits
                ],
            }
        )
        features = [{"name": ext, "dtype": "image"} for ext in IMAGE_EXTS]
        features += [
            _hf_field("json", _json_type(docs)),
            {"name": "txt", "dtype": "string"},
            {"name": "__key__", "dtype": "string"},
            {"name": "__url__", "dtype": "string"},
        ]
        infos.append({"config_name": branch, "features": features})
    header = json.dumps({"configs": configs, "dataset_info": infos}, indent=1)
    first = configs[0]["config_name"] if configs else "pub11"
    return (
        f"---\n{header}\n---\n\n# RS5M-style shards\n\n"
        "Webdataset tars written by rs5m-curator: `<key>.<jpg|png|webp>` (the image bytes as "
        "downloaded), `<key>.txt` (caption), `<key>.json` (uid, source, split, places, scores, "
        "metadata). `manifest.json` lists every tar with its sample count and sha256.\n\n"
        "```python\nimport datasets\n"
        f'ds = datasets.load_dataset("<this folder>", "{first}")\n'
        "```\n"
    )


def build_shards(
    root: DatasetRoot,
    branches: Mapping[str, str],
    config: ShardConfig | None = None,
    *,
    kept_from: str = OUTLIERS,
    reshard: bool = False,
    fallback: bool = True,
) -> Manifest:
    """collect_samples + write_shards: the whole shard step."""
    got = collect_samples(root, branches, kept_from=kept_from, fallback=fallback)
    return write_shards(root, got.by_branch, config, reshard=reshard, removed=got.removed)


# -- verification ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One thing ``rs5m verify`` found wrong."""

    shard: str
    kind: (
        str  # manifest_missing, missing, size, sha256, samples, unreadable, unlisted, samples_table
    )
    detail: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.kind}: {self.detail}"


class _HashingReader:
    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _scan_shard(f: BinaryIO) -> tuple[int, int, str, str | None]:
    """(samples, bytes, sha256, error) of one tar, in one pass."""
    reader = _HashingReader(f)
    keys: dict[str, set[str]] = {}
    error = None
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                keys.setdefault(key, set()).add(ext)
    except (tarfile.TarError, EOFError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    reader.drain()
    bad = sorted(k for k, e in keys.items() if not ({"json", "txt"} <= e and e & set(IMAGE_EXTS)))
    if bad and error is None:
        error = f"incomplete samples: {bad[:5]}"
    return len(keys), reader.size, reader.sha.hexdigest(), error


def verify_shards(root: DatasetRoot, config: ShardConfig | None = None) -> list[Problem]:
    """Check every shard against the manifest: present, same size, same sha256, same sample
    count, readable with complete samples; tars on disk that the manifest does not list, and
    a samples table that disagrees with the manifest, are problems too. Empty list: all good."""
    config = config or ShardConfig()
    directory = shard_dir(root, config)
    manifest = read_manifest(root, config)
    if manifest is None:
        return [Problem("manifest.json", "manifest_missing", f"no manifest in {directory}")]
    problems: list[Problem] = []
    for s in manifest.shards:
        path = posixpath.join(directory, s.shard)
        if not root.exists(path):
            problems.append(Problem(s.shard, "missing", "listed in the manifest, not on disk"))
            continue
        with root.fs.open(path, "rb") as f:
            n, size, sha, error = _scan_shard(f)
        if size != s.bytes:
            problems.append(Problem(s.shard, "size", f"{size} bytes, manifest says {s.bytes}"))
        if sha != s.sha256:
            problems.append(Problem(s.shard, "sha256", f"{sha}, manifest says {s.sha256}"))
        if error is not None:
            problems.append(Problem(s.shard, "unreadable", error))
        if n != s.samples:
            problems.append(Problem(s.shard, "samples", f"{n} samples, manifest says {s.samples}"))
    listed = {s.shard for s in manifest.shards}
    for path in root.glob(f"{config.shard_dir}/*.tar"):
        if posixpath.basename(path) not in listed:
            problems.append(Problem(posixpath.basename(path), "unlisted", "not in the manifest"))
    samples_path = posixpath.join(directory, "samples.parquet")
    if root.exists(samples_path):
        agg = root.read_table(samples_path, columns=["shard"]).group_by("shard")
        agg = agg.aggregate([("shard", "count")]).to_pydict()
        counts = dict(zip(agg["shard"], agg["shard_count"], strict=True))
        for s in manifest.shards:
            if counts.get(s.shard, 0) != s.samples:
                problems.append(
                    Problem(
                        s.shard,
                        "samples_table",
                        f"samples.parquet has {counts.get(s.shard, 0)}, manifest says {s.samples}",
                    )
                )
    else:
        problems.append(Problem("samples.parquet", "missing", "no samples table"))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tasks.shard verify --root DIR``: exit status 1 when a shard is wrong."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tasks.shard")
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every shard against the manifest")
    v.add_argument("--root", required=True, help="dataset root (path or fsspec URL)")
    v.add_argument("--shard-dir", default=ShardConfig().shard_dir)
    args = ap.parse_args(argv)
    root = DatasetRoot(args.root)
    problems = verify_shards(root, ShardConfig(shard_dir=args.shard_dir))
    for p in problems:
        print(p)
    manifest = read_manifest(root, ShardConfig(shard_dir=args.shard_dir))
    if not problems and manifest is not None:
        print(f"ok: {len(manifest.shards)} shards, {manifest.total()} samples")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
