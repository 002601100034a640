"""Validate stage: Pillow decoding, removal reasons and normalisation (no network: the download
partition is written by a stand-in stage)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from rs5m.image_server import decompression_bomb_png, write_problem_images
from schemas.download_config import ValidateConfig
from schemas.tables import DOWNLOAD, DOWNLOADS, KEYWORD_FILTER, VALIDATE, VALIDATED
from storage.root import DatasetRoot
from storage.stage import Partition, Stage, StageContext, StageResult, run_partition
from tasks.validate import InvalidImage, ValidateStage, check_image

DEMO = Path(__file__).resolve().parents[1] / "rs5m" / "demo_data" / "images"
PART = Partition("web", "p0")


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("problems")
    return folder, write_problem_images(folder)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_problem_images_get_their_outcome(problems):
    folder, expected = problems
    cfg = ValidateConfig()
    for name, outcome in expected.items():
        data = (folder / name).read_bytes()
        try:
            info = check_image(data, cfg)
        except InvalidImage as exc:
            assert exc.reason == outcome, (name, exc.detail)
            continue
        assert outcome in ("valid", "normalized"), (name, info)
        assert (info["normalized"] is not None) == (outcome == "normalized"), (name, info)
        assert info["mode"] in ("RGB", "L")


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    info = check_image(_png(Image.fromarray(ramp)), ValidateConfig())
    assert info["normalized"] == "16bit" and info["original_mode"].startswith("I")
    with Image.open(io.BytesIO(info["normalized_bytes"])) as im:
        arr = np.asarray(im)
    assert im.mode == "RGB" and arr.dtype == np.uint8
    assert arr.max() >= 250 and arr.min() == 0  # the full range survives


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (80, 40), (200, 0, 0))
    im.paste((0, 0, 200), (0, 0, 40, 40))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    info = check_image(buf.getvalue(), ValidateConfig())
    assert (info["width"], info["height"]) == (40, 80)
    with Image.open(io.BytesIO(info["normalized_bytes"])) as out:
        assert out.getexif().get(0x0112, 1) == 1
        r, _, b = out.convert("RGB").getpixel((20, 10))
        assert b > r  # rotated 90 degrees clockwise: the blue half is on top
    off = check_image(buf.getvalue(), ValidateConfig(apply_exif_orientation=False))
    assert off["normalized"] is None and (off["width"], off["height"]) == (80, 40)


def test_cmyk_palette_alpha_become_rgb():
    base = Image.new("RGB", (48, 48), (10, 120, 240))
    cmyk = io.BytesIO()
    base.convert("CMYK").save(cmyk, "JPEG")
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: white after flattening
    for data, step in (
        (cmyk.getvalue(), "cmyk"),
        (_png(base.convert("P")), "palette"),
        (_png(rgba), "alpha"),
        (_png(base.convert("1")), "mode_1"),
    ):
        info = check_image(data, ValidateConfig())
        assert info["normalized"] == step and info["mode"] == "RGB"
    info = check_image(_png(rgba), ValidateConfig())
    with Image.open(io.BytesIO(info["normalized_bytes"])) as im:
        assert im.getpixel((5, 5)) == (255, 255, 255)


def test_limits():
    cfg = ValidateConfig(min_side=50, max_pixels=100 * 100)
    with pytest.raises(InvalidImage) as e:
        check_image(_png(Image.new("RGB", (49, 200))), cfg)
    assert e.value.reason == "too_small"
    with pytest.raises(InvalidImage) as e:
        check_image(_png(Image.new("RGB", (101, 100))), cfg)
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(InvalidImage) as e:  # header says 900 MP: refused before decoding
        check_image(decompression_bomb_png(), ValidateConfig())
    assert e.value.reason == "too_many_pixels"
    for data, reason in (
        (b"", "empty"),
        (b"<html></html>", "unreadable"),
        (b"\xff\xd8\xff", "unreadable"),
    ):
        with pytest.raises(InvalidImage) as e:
            check_image(data, ValidateConfig())
        assert e.value.reason == reason
    png = _png(Image.new("RGB", (64, 64), (1, 2, 3)))
    with pytest.raises(InvalidImage) as e:
        check_image(png[: len(png) - 30], ValidateConfig())
    assert e.value.reason in ("truncated", "unreadable")


class FakeCandidates(Stage):
    name = KEYWORD_FILTER
    version = "1"

    def run(self, ctx: StageContext) -> StageResult:
        return StageResult(output=pa.table({"uid": pa.array([], pa.uint64())}))


class FakeDownload(Stage):
    """Writes a webdataset tar like img2dataset's, and its DOWNLOADS rows (plus failures)."""

    name = DOWNLOAD
    version = "1"
    inputs = (KEYWORD_FILTER,)

    def __init__(self, images: dict[int, bytes]):
        self.images = images

    def run(self, ctx: StageContext) -> StageResult:
        side = Path(ctx.side_dir)
        side.mkdir(parents=True, exist_ok=True)
        rows = []
        with tarfile.open(side / "00000.tar", "w") as tar:
            for i, (uid, data) in enumerate(sorted(self.images.items())):
                key = f"{i:09d}"
                for name, payload in ((f"{key}.jpg", data), (f"{key}.json", b"{}")):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(payload)
                    tar.addfile(ti, io.BytesIO(payload))
                rows.append(
                    {
                        "uid": uid,
                        "status": "success",
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "bytes": len(data),
                        "tar": f"stages/download/{PART.source}/{PART.name}/00000.tar",
                        "key": key,
                    }
                )
        rows.append({"uid": 999, "status": "failed", "error_class": "http_4xx"})
        return StageResult(output=pa.Table.from_pylist(rows, DOWNLOADS))


def test_stage_streams_tars_and_writes_normalised_images(problems, tmp_path):
    folder, expected = problems
    names = sorted(expected)
    tile = sorted((DEMO / "eurosat").glob("*.jpg"))[0].read_bytes()
    images = {i + 1: (folder / n).read_bytes() for i, n in enumerate(names)}
    images[100] = tile
    root = DatasetRoot(tmp_path / "root")
    assert run_partition(root, FakeCandidates(), PART).status == "done"
    assert run_partition(root, FakeDownload(images), PART).status == "done"
    out = run_partition(root, ValidateStage(ValidateConfig()), PART)
    assert out.status == "done", out.error

    valid = root.read_table(root.output_path(VALIDATE, PART.source, PART.name))
    assert valid.schema.equals(VALIDATED)
    ledger = root.read_table(root.ledger_path(VALIDATE, PART.source, PART.name)).to_pylist()
    kept = {r["uid"]: r for r in valid.to_pylist()}
    removed = {r["uid"]: r["reason"] for r in ledger}
    assert set(kept) | set(removed) == set(images) and not set(kept) & set(removed)
    assert len(images) == len(kept) + len(removed)  # downloaded = valid + invalid, exactly
    for uid, name in zip(range(1, len(names) + 1), names, strict=True):
        outcome = expected[name]
        if outcome in ("valid", "normalized"):
            assert (kept[uid]["normalized"] is not None) == (outcome == "normalized"), name
        else:
            assert removed[uid] == outcome, name
    assert kept[100]["normalized"] is None and kept[100]["member"].endswith(".jpg")
    assert kept[100]["sha256"] == hashlib.sha256(tile).hexdigest()
    for row in kept.values():
        with tarfile.open(root.join(row["tar"])) as tar:
            data = tar.extractfile(row["member"]).read()
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["bytes"]
        if row["normalized"]:
            assert row["tar"].startswith(f"stages/validate/{PART.source}/{PART.name}/normalized-")
    # the second run is skipped; a changed setting reruns and replaces the normalised tar
    assert run_partition(root, ValidateStage(ValidateConfig()), PART).status == "skipped"
    assert run_partition(root, ValidateStage(ValidateConfig(min_side=100)), PART).status == "done"
    side = Path(root.side_dir(VALIDATE, PART.source, PART.name))
    assert len(list(side.glob("normalized-*.tar"))) == 1
    ledger = root.read_table(root.ledger_path(VALIDATE, PART.source, PART.name)).to_pylist()
    assert {r["reason"] for r in ledger if r["uid"] == 100} == {"too_small"}  # 64x64 tile
