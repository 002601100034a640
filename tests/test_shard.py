"""The shard step: webdataset tars from committed stage partitions, manifest, ledger, verify."""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import webdataset as wds
from PIL import Image

from schemas.shard_config import ShardConfig
from schemas.tables import (
    DOWNLOAD,
    GEOTAG,
    KEYWORD_FILTER,
    OUTLIERS,
    SAMPLES,
    VALIDATE,
    sample_uid,
)
from storage.root import DatasetRoot
from storage.stage import Partition, Stage, StageContext, StageResult, run_partition
from tasks.shard import (
    build_shards,
    collect_samples,
    read_manifest,
    split_of,
    verify_shards,
    write_shards,
)
from tasks.shard import main as shard_main

BRANCHES = {"laion": "pub11", "aid": "rs3"}
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def image_bytes(seed: int, fmt: str = "jpg", size: tuple[int, int] = (72, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=FORMATS[fmt])
    return buf.getvalue()


class _TableStage(Stage):
    """Commits a prepared table per partition (and, for download, the image tar)."""

    version = "t"
    tables: ClassVar[dict[str, pa.Table]] = {}
    tars: ClassVar[dict[str, dict[str, bytes]]] = {}

    def params(self) -> dict[str, Any]:
        return {}

    def run(self, ctx: StageContext) -> StageResult:
        table = self.tables[ctx.partition.id]
        removed = None
        if "keep" in table.column_names:  # decisions: the dropped ones go to the ledger
            gone = table.filter(pc.invert(table.column("keep")))
            removed = pa.table(
                {"uid": gone.column("uid"), "reason": ["outlier"] * gone.num_rows},
            )
        return StageResult(output=table, removed=removed)


def _stage(name: str, inputs: tuple[str, ...]) -> type[_TableStage]:
    return type(f"Fake_{name}", (_TableStage,), {"name": name, "inputs": inputs, "tables": {}})


class Upstream:
    """Builds keyword_filter -> download -> validate -> outliers -> geotag partitions."""

    def __init__(self, root: DatasetRoot):
        self.root = root
        self.stages = {
            KEYWORD_FILTER: _stage(KEYWORD_FILTER, ()),
            DOWNLOAD: _stage(DOWNLOAD, (KEYWORD_FILTER,)),
            VALIDATE: _stage(VALIDATE, (DOWNLOAD,)),
            OUTLIERS: _stage(OUTLIERS, (VALIDATE,)),
            GEOTAG: _stage(GEOTAG, (OUTLIERS,)),
        }
        self.images: dict[int, bytes] = {}
        self.captions: dict[int, str] = {}
        self.kept: set[int] = set()

    def add(
        self,
        source: str,
        partition: str,
        n: int,
        *,
        drop_every: int = 4,
        stages: tuple[str, ...] = (KEYWORD_FILTER, DOWNLOAD, VALIDATE, OUTLIERS, GEOTAG),
        tamper: Any = None,
        exact_member: bool = False,
        real_validate: bool = False,
    ) -> list[int]:
        """n samples; every ``drop_every``-th is an outlier. Returns the uids."""
        rows = []
        for i in range(n):
            url = f"http://example.org/{source}/{partition}/{i}.img"
            caption = f"aerial view {source} {partition} {i} über"
            uid = sample_uid(source, url, caption)
            fmt = ("jpg", "png", "webp")[i % 3]
            data = image_bytes(uid % 10_000, fmt, (40 + i, 30 + 2 * i))
            rows.append((uid, url, caption, fmt, data, i))
        side = self.root.side_dir(DOWNLOAD, source, partition)
        tar_rel = posixpath.relpath(posixpath.join(side, "00000.tar"), self.root.path)
        members = {}
        for _uid, _, _, fmt, data, i in rows:
            members[f"{i:09d}.{fmt}"] = data
        if tamper is not None:
            members = tamper(members)
        self.root.fs.makedirs(side, exist_ok=True)
        with tarfile.open(self.root.join(tar_rel), "w") as tf:
            for name, data in members.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        uids = [r[0] for r in rows]
        t = {
            KEYWORD_FILTER: pa.table(
                {
                    "uid": pa.array(uids, pa.uint64()),
                    "source": [source] * n,
                    "partition": [partition] * n,
                    "url": [r[1] for r in rows],
                    "caption": [r[2] for r in rows],
                    "width": pa.array([40 + r[5] for r in rows], pa.int64()),
                    "height": pa.array([30 + 2 * r[5] for r in rows], pa.int64()),
                    "keywords": [["aerial"]] * n,
                    "similarity": [float("nan") if r[5] == 1 else 0.3 for r in rows],
                }
            ),
            DOWNLOAD: pa.table(
                {
                    "uid": pa.array(uids, pa.uint64()),
                    "status": ["success"] * n,
                    "sha256": [hashlib.sha256(r[4]).hexdigest() for r in rows],
                    "tar": [tar_rel] * n,
                    "key": [f"{r[5]:09d}" for r in rows],
                }
            ),
            VALIDATE: pa.table(
                {
                    "uid": pa.array(uids, pa.uint64()),
                    "width": pa.array([40 + r[5] for r in rows], pa.int64()),
                    "height": pa.array([30 + 2 * r[5] for r in rows], pa.int64()),
                    "tar": [tar_rel] * n,
                    "key": [f"{r[5]:09d}" for r in rows],
                    "format": [("jpeg", "png", "webp")[r[5] % 3] for r in rows],
                }
            ),
            OUTLIERS: pa.table(
                {
                    "uid": pa.array(uids, pa.uint64()),
                    "keep": [r[5] % drop_every != drop_every - 1 for r in rows],
                    "reason": [None] * n,
                    "clip_score": pa.array([0.25] * n, pa.float32()),
                    "rs_prob": pa.array([0.9] * n, pa.float32()),
                }
            ),
            GEOTAG: pa.table(
                {
                    "uid": pa.array(uids, pa.uint64()),
                    "places": [[{"name": "Paris", "country_code": "FR", "lat": 48.85, "lon": 2.35}]]
                    * n,
                    "lat": [48.85] * n,
                    "lon": [2.35] * n,
                    "utm_zone": ["31U"] * n,
                    "country_code": ["FR"] * n,
                }
            ),
        }
        if exact_member:  # like tasks/validate.py: the exact member name and its sha256
            v = t[VALIDATE]
            v = v.append_column("member", pa.array([f"{r[5]:09d}.{r[3]}" for r in rows]))
            t[VALIDATE] = v.append_column("sha256", t[DOWNLOAD].column("sha256"))
        part = Partition(source, partition)
        for name in stages:
            if name == VALIDATE and real_validate:
                from schemas.download_config import ValidateConfig
                from tasks.validate import ValidateStage

                stage = ValidateStage(ValidateConfig(min_side=8))
                assert run_partition(self.root, stage, part).status == "done"
                continue
            cls = self.stages[name]
            cls.tables[part.id] = t[name]
            assert run_partition(self.root, cls(), part).status == "done"
        for uid, _, caption, _, data, i in rows:
            self.images[uid] = data
            self.captions[uid] = caption
            if OUTLIERS not in stages or i % drop_every != drop_every - 1:
                self.kept.add(uid)
        return uids


CONFIG = ShardConfig(samples_per_shard=5, val_ratio=0.2)


@pytest.fixture
def upstream(tmp_path) -> Upstream:
    up = Upstream(DatasetRoot(tmp_path / "root"))
    up.add("laion", "part-00000", 12)
    up.add("laion", "part-00001", 9)
    up.add("aid", "scenes-0", 7, exact_member=True)
    return up


def _read_wds(urls: list[str]) -> list[dict[str, Any]]:
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_roundtrip_webdataset_and_tarfile(upstream):
    root = upstream.root
    manifest = build_shards(root, BRANCHES, CONFIG)
    assert {s.branch for s in manifest.shards} == {"pub11", "rs3"}
    assert manifest.total() == len(upstream.kept) == 9 + 7 + 6
    for s in manifest.shards:
        assert s.samples <= CONFIG.samples_per_shard
        assert s.shard == f"{s.branch}-{s.split}-{s.index:04d}.tar"

    samples = _read_wds(manifest.urls())
    assert len(samples) == manifest.total()
    seen = set()
    for smp in samples:
        exts = {k for k in smp if not k.startswith("__")}
        assert exts in ({"jpg", "json", "txt"}, {"png", "json", "txt"}, {"webp", "json", "txt"})
        meta = json.loads(smp["json"])
        uid = int(meta["uid"], 16)
        assert smp["__key__"] == meta["uid"] == f"{uid:016x}"
        image = next(smp[e] for e in ("jpg", "png", "webp") if e in smp)
        assert image == upstream.images[uid]  # never re-encoded
        assert smp["txt"].decode() == upstream.captions[uid]
        assert meta["source"] in BRANCHES
        assert meta["split"] == split_of(uid, CONFIG.val_ratio, CONFIG.split_salt)
        assert meta["places"][0]["country_code"] == "FR"
        assert meta["scores"]["rs_prob"] == pytest.approx(0.9)
        assert meta["metadata"]["url"].startswith("http://example.org/")
        assert meta["metadata"]["utm_zone"] == "31U"
        assert "similarity" in meta["metadata"]  # NaN written as null, valid JSON
        seen.add(uid)
    assert seen == upstream.kept

    # tarfile: sorted members, fixed header fields; each tar is sorted by uid
    for url in manifest.urls():
        with tarfile.open(url) as tf:
            members = tf.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
    # the samples table (what stats counts as `remain`) agrees
    table = root.read_table(posixpath.join(manifest.directory, "samples.parquet"))
    assert table.schema.equals(SAMPLES)
    assert table.num_rows == manifest.total()
    assert set(table.column("uid").to_pylist()) == upstream.kept
    sizes = root.read_json(posixpath.join(manifest.directory, "sizes.json"))
    assert sizes == {s.shard: s.samples for s in manifest.shards}
    card = (Path(manifest.directory) / "README.md").read_text()
    header = json.loads(card.split("---\n")[1])  # the YAML header is written as JSON
    assert [c["config_name"] for c in header["configs"]] == ["pub11", "rs3"]
    json_feature = next(f for f in header["dataset_info"][0]["features"] if f["name"] == "json")
    assert {f["name"] for f in json_feature["struct"]} >= {"uid", "places", "scores", "metadata"}
    mtable = root.read_table(posixpath.join(manifest.directory, "manifest.parquet"))
    assert mtable.column("sha256").to_pylist() == [s.sha256 for s in manifest.shards]
    assert verify_shards(root, CONFIG) == []


def test_split_is_stable_and_follows_ratio():
    uids = [sample_uid("x", str(i)) for i in range(4000)]
    val = sum(split_of(u, 0.1, "s") == "val" for u in uids)
    assert 300 < val < 500
    assert [split_of(u, 0.1, "s") for u in uids[:50]] == [split_of(u, 0.1, "s") for u in uids[:50]]
    assert all(split_of(u, 0.0, "s") == "train" for u in uids[:50])
    assert all(split_of(u, 1.0, "s") == "val" for u in uids[:50])


def test_rebuild_is_byte_identical(upstream, tmp_path):
    first = build_shards(upstream.root, BRANCHES, CONFIG)
    digests = {s.shard: s.sha256 for s in first.shards}
    again = build_shards(upstream.root, BRANCHES, CONFIG, reshard=True)
    assert {s.shard: s.sha256 for s in again.shards} == digests
    assert sorted(again.written) == sorted(digests)
    # a second root built from the same inputs: the same bytes
    other = Upstream(DatasetRoot(tmp_path / "other"))
    other.add("aid", "scenes-0", 7, exact_member=True)
    other.add("laion", "part-00001", 9)
    other.add("laion", "part-00000", 12)
    third = build_shards(other.root, BRANCHES, CONFIG)
    assert {s.shard: s.sha256 for s in third.shards} == digests
    # nothing new: an incremental build writes nothing
    fourth = build_shards(upstream.root, BRANCHES, CONFIG)
    assert fourth.written == [] and {s.shard: s.sha256 for s in fourth.shards} == digests


def test_incremental_adds_new_shards_and_reshard_rewrites(upstream):
    root = upstream.root
    first = build_shards(root, BRANCHES, CONFIG)
    before = {s.shard: s.sha256 for s in first.shards}
    last = {
        (b, sp): max(s.index for s in first.select(b, sp))
        for b, sp in {(s.branch, s.split) for s in first.shards}
    }
    new_uids = upstream.add("laion", "part-00002", 10)
    second = build_shards(root, BRANCHES, CONFIG)
    assert second.total() == len(upstream.kept)
    for s in second.shards:  # old shards untouched
        if s.shard in before:
            assert s.sha256 == before[s.shard]
    assert second.written and not set(second.written) & set(before)
    for name in second.written:
        s = next(x for x in second.shards if x.shard == name)
        assert s.branch == "pub11" and s.index > last.get((s.branch, s.split), -1)
    new_kept = upstream.kept & set(new_uids)
    samples = root.read_table(posixpath.join(second.directory, "samples.parquet")).to_pylist()
    assert {r["uid"] for r in samples if r["shard"] in second.written} == new_kept
    assert verify_shards(root, CONFIG) == []

    # reshard: everything rewritten from index 0, contiguous, full shards
    third = build_shards(root, BRANCHES, CONFIG, reshard=True)
    assert third.total() == len(upstream.kept)
    for b, sp in {(s.branch, s.split) for s in third.shards}:
        sel = third.select(b, sp)
        assert [s.index for s in sel] == list(range(len(sel)))
        assert all(s.samples == CONFIG.samples_per_shard for s in sel[:-1])
    assert len(root.glob("shards/*.tar")) == len(third.shards)  # older leftovers removed
    assert verify_shards(root, CONFIG) == []
    with pytest.raises(ValueError, match="reshard"):
        build_shards(root, BRANCHES, ShardConfig(samples_per_shard=5, val_ratio=0.5))


def test_corrupt_download_members_go_to_ledger(tmp_path):
    up = Upstream(DatasetRoot(tmp_path / "root"))
    flipped = {}

    def tamper(members: dict[str, bytes]) -> dict[str, bytes]:
        members = dict(members)
        del members["000000002.webp"]  # missing member
        data = bytearray(members["000000004.png"])
        data[len(data) // 2] ^= 0xFF  # flipped byte: sha256 no longer matches
        members["000000004.png"] = bytes(data)
        flipped["name"] = "000000004.png"
        return members

    uids = up.add("laion", "p0", 8, drop_every=100, tamper=tamper)
    up.add("laion", "p1", 6, drop_every=100)
    # p1: truncate the tar in the middle of its last member
    tar_path = up.root.join(
        posixpath.relpath(up.root.side_dir(DOWNLOAD, "laion", "p1"), up.root.path), "00000.tar"
    )
    with tarfile.open(tar_path) as tf:
        last = tf.getmembers()[-1]
    with open(tar_path, "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)

    manifest = build_shards(up.root, {"laion": "pub11"}, CONFIG)
    ledger = up.root.read_table(up.root.ledger_path("shard", "_all", "shards")).to_pylist()
    reasons = {(r["partition"], r["reason"]) for r in ledger}
    assert ("p0", "missing_member") in reasons
    assert ("p0", "checksum_mismatch") in reasons
    assert ("p1", "unreadable_member") in reasons
    assert all(r["stage"] == "shard" and r["source"] == "laion" for r in ledger)
    assert {r["uid"] for r in ledger if r["partition"] == "p0"} == {uids[2], uids[4]}
    assert len(ledger) == 3
    assert manifest.total() == 8 + 6 - 3
    assert len(_read_wds(manifest.urls())) == manifest.total()
    assert verify_shards(up.root, CONFIG) == []


def test_sample_count_equals_remain_in_stats(tmp_path):
    """downloaded - invalid (incl. unreadable at sharding) - outliers = samples in the shards."""
    from storage.catalog import connect, statistics

    up = Upstream(DatasetRoot(tmp_path / "root"))

    def drop_one(members: dict[str, bytes]) -> dict[str, bytes]:
        return {k: v for k, v in members.items() if not k.startswith("000000001.")}

    up.add("laion", "p0", 12, tamper=drop_one)
    up.add("laion", "p1", 9)
    up.add("aid", "s0", 5)
    manifest = build_shards(up.root, BRANCHES, CONFIG)
    con = connect(up.root, persistent=False)
    try:
        stats = {r["source"]: r for r in statistics(con)}
    finally:
        con.close()
    samples = up.root.read_table(posixpath.join(manifest.directory, "samples.parquet"))
    for source in ("laion", "aid"):
        n = sum(1 for s in samples.column("source").to_pylist() if s == source)
        assert stats[source]["remain"] == n
    assert stats["laion"]["invalid_removed"] == 1  # the missing member, found when sharding
    assert stats["total"]["remain"] == manifest.total() == samples.num_rows


def test_verify_catches_flipped_byte_missing_and_unlisted(upstream, capsys):
    root = upstream.root
    manifest = build_shards(root, BRANCHES, CONFIG)
    assert verify_shards(root, CONFIG) == []
    assert shard_main(["verify", "--root", root.path]) == 0
    assert f"ok: {len(manifest.shards)} shards" in capsys.readouterr().out
    target = manifest.urls()[1]
    with open(target, "r+b") as f:
        f.seek(700)  # inside the first member's data
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0x01]))
    problems = verify_shards(root, CONFIG)
    assert [(p.shard, p.kind) for p in problems] == [(posixpath.basename(target), "sha256")]
    assert shard_main(["verify", "--root", root.path]) == 1
    assert "sha256" in capsys.readouterr().out

    # a flipped byte in a tar header is also unreadable
    other = manifest.urls()[0]
    with open(other, "r+b") as f:
        f.seek(0)
        f.write(b"\x00")
    kinds = {(p.shard, p.kind) for p in verify_shards(root, CONFIG)}
    assert (posixpath.basename(other), "sha256") in kinds
    assert (posixpath.basename(other), "unreadable") in kinds or (
        posixpath.basename(other),
        "samples",
    ) in kinds

    root.fs.rm(manifest.urls()[2])
    with open(posixpath.join(manifest.directory, "stray-train-0000.tar"), "wb") as f:
        f.write(b"\x00" * 1024)
    kinds = {(p.shard, p.kind) for p in verify_shards(root, CONFIG)}
    assert (manifest.shards[2].shard, "missing") in kinds
    assert ("stray-train-0000.tar", "unlisted") in kinds


def test_verify_without_manifest(tmp_path):
    problems = verify_shards(DatasetRoot(tmp_path / "empty"))
    assert [p.kind for p in problems] == ["manifest_missing"]


def test_kept_from_falls_back_to_validate_and_rejects_unknown_sources(tmp_path):
    up = Upstream(DatasetRoot(tmp_path / "root"))
    up.add("laion", "a", 6, stages=(KEYWORD_FILTER, DOWNLOAD, VALIDATE))
    up.add("laion", "b", 8)
    got = collect_samples(up.root, {"laion": "pub11"})
    assert got.kept_stage == {"laion/a": VALIDATE, "laion/b": OUTLIERS}
    assert got.by_branch["pub11"].num_rows == 6 + 6
    strict = collect_samples(up.root, {"laion": "pub11"}, fallback=False)
    assert strict.by_branch["pub11"].num_rows == 6
    only_validate = collect_samples(up.root, {"laion": "pub11"}, kept_from=VALIDATE)
    assert only_validate.by_branch["pub11"].num_rows == 14
    with pytest.raises(ValueError, match="without a branch"):
        collect_samples(up.root, {"other": "pub11"})


def test_write_shards_from_loose_files(tmp_path):
    """RS3-style inputs: images as files instead of tar members."""
    root = DatasetRoot(tmp_path / "root")
    rows = []
    for i in range(7):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(image_bytes(i))
        rows.append(
            {
                "uid": 1000 + i,
                "source": "aid",
                "partition": "x",
                "caption": f"scene {i}",
                "tar": None,
                "member": None,
                "path": str(p) if i != 3 else str(tmp_path / "missing.jpg"),
                "sha256": None,
                "info": json.dumps({"places": [], "scores": {}, "metadata": {}}),
            }
        )
    from tasks.shard import SHARD_INPUT

    manifest = write_shards(
        root, {"rs3": pa.Table.from_pylist(rows, schema=SHARD_INPUT)}, ShardConfig(val_ratio=0)
    )
    assert [(s.shard, s.samples) for s in manifest.shards] == [("rs3-train-0000.tar", 6)]
    ledger = root.read_table(root.ledger_path("shard", "_all", "shards")).to_pylist()
    assert [(r["uid"], r["reason"]) for r in ledger] == [(1003, "unreadable_file")]
    assert read_manifest(root).total() == 6


def test_shards_on_a_non_local_filesystem():
    """The same code over fsspec (memory://): tars, manifest, verify, urls with the protocol."""
    import uuid

    from tasks.shard import SHARD_INPUT

    root = DatasetRoot(f"memory://rs5m-shard-{uuid.uuid4().hex[:8]}")
    rows = []
    for i in range(5):
        root.write_bytes(root.join(f"images/{i}.png"), image_bytes(i, "png"))
        rows.append(
            {
                "uid": 77 + i,
                "source": "aid",
                "partition": "m",
                "caption": f"scene {i}",
                "tar": None,
                "member": None,
                "path": f"images/{i}.png",  # relative to the root
                "sha256": None,
                "info": json.dumps({"places": [], "scores": {}, "metadata": {}}),
            }
        )
    config = ShardConfig(samples_per_shard=2, val_ratio=0.0)
    table = pa.Table.from_pylist(rows, schema=SHARD_INPUT)
    manifest = write_shards(root, {"rs3": table}, config)
    assert [s.samples for s in manifest.shards] == [2, 2, 1]
    assert all(u.startswith("memory://") for u in manifest.urls())
    assert verify_shards(root, config) == []
    again = write_shards(root, {"rs3": table}, config, reshard=True)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]
    with (
        root.fs.open(root.join("shards", manifest.shards[0].shard), "rb") as f,
        tarfile.open(fileobj=f) as tf,
    ):
        names = tf.getnames()
    assert names == sorted(names) and len(names) == 6


def test_with_the_real_validate_stage(tmp_path):
    """tasks/validate.py's output (tar, key, member, format, sha256) feeds the shard step."""
    up = Upstream(DatasetRoot(tmp_path / "root"))
    up.add("laion", "p0", 9, real_validate=True)
    validated = up.root.read_table(up.root.output_path(VALIDATE, "laion", "p0"))
    assert {"tar", "member", "sha256"} <= set(validated.column_names)
    manifest = build_shards(up.root, {"laion": "pub11"}, CONFIG)
    assert manifest.total() == len(up.kept)
    for smp in _read_wds(manifest.urls()):
        uid = int(smp["__key__"], 16)
        image = next(smp[e] for e in ("jpg", "png", "webp") if e in smp)
        assert image == up.images[uid]
    assert verify_shards(up.root, CONFIG) == []
