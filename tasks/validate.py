"""Validate stage: decode every downloaded image with Pillow; remove those that cannot serve
training, normalise the rest.

Reads the download stage's tar shards as streams (images are never exploded into loose files).
Removed, with the reason in the ledger: ``empty``, ``truncated``, ``too_many_pixels`` (larger than
``max_pixels``: decompression bombs are refused from the header, before decoding), ``too_small``
(a side under ``min_side``) and ``unreadable`` (not decodable by Pillow).

Normalisation: an image whose mode is not in ``keep_modes`` (CMYK, palette, 16-bit, alpha, bilevel,
float, ...) becomes 8-bit RGB; an EXIF orientation other than 1 is applied; a format other than
JPEG, PNG or WebP is re-encoded. Only such images are re-encoded (JPEG sources as JPEG, others as
lossless PNG) into this stage's own tar, ``stages/validate/<source>/<partition>/
normalized-<fingerprint>.tar`` (members ``<uid hex>.<ext>``); every other image keeps its
original bytes in the download tar. The output (``schemas.tables.VALIDATED``) says per
uid which ``tar`` and ``member`` hold the final bytes.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas.download_config import ValidateConfig
from schemas.tables import DOWNLOAD, VALIDATE, VALIDATED
from storage.stage import (
    Stage,
    StageContext,
    StageResult,
    dumps_detail,
    partition_fingerprint,
)

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "TIFF": "tif", "BMP": "bmp"}
_ORIENTATION = 0x0112


class InvalidImage(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _decode_error(exc: Exception) -> InvalidImage:
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if "truncat" in low or "broken data stream" in low or "premature end" in low:
        return InvalidImage("truncated", text)
    return InvalidImage("unreadable", text)


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str]:
    """An 8-bit RGB copy of ``im`` and the name of the step."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im)
        if arr.dtype.itemsize > 1:
            top = 65535 if mode.startswith("I;16") or arr.max() > 255 else 255
            arr = np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).round()
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB"), "16bit"
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.nan_to_num(arr).astype(np.uint8), "L").convert("RGB"), "float"
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA") if has_alpha else im.convert("RGB")
        if not has_alpha:
            return im, "palette"
        return _flatten_alpha(im), "palette,alpha"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        return _flatten_alpha(im.convert("RGBA")), "alpha"
    if mode == "CMYK":
        return im.convert("RGB"), "cmyk"
    return im.convert("RGB"), f"mode_{mode.lower().replace(';', '_')}"


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def check_image(data: bytes, cfg: ValidateConfig) -> dict[str, Any]:
    """Decode ``data``; raise :class:`InvalidImage` or return the validated image's facts, with
    ``normalized_bytes`` set when the image had to be rewritten."""
    if not data:
        raise InvalidImage("empty", "0 bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise InvalidImage("too_many_pixels", str(exc)) from None
        except UnidentifiedImageError as exc:
            raise InvalidImage("unreadable", str(exc)) from None
        except Exception as exc:
            raise _decode_error(exc) from None
        with im:
            width, height = im.size
            if width * height > cfg.max_pixels:
                raise InvalidImage("too_many_pixels", f"{width}x{height} > {cfg.max_pixels} pixels")
            if min(width, height) < cfg.min_side:
                raise InvalidImage("too_small", f"{width}x{height}, min side {cfg.min_side}")
            try:
                im.load()
            except Image.DecompressionBombError as exc:
                raise InvalidImage("too_many_pixels", str(exc)) from None
            except Exception as exc:
                raise _decode_error(exc) from None
            fmt = im.format or "UNKNOWN"
            original_mode = im.mode
            steps: list[str] = []
            out = im
            if cfg.apply_exif_orientation:
                try:
                    orientation = im.getexif().get(_ORIENTATION, 1)
                except Exception:
                    orientation = 1
                if orientation not in (1, None):
                    out = ImageOps.exif_transpose(out)
                    steps.append("exif_transpose")
            if out.mode not in cfg.keep_modes:
                out, step = _to_rgb(out)
                steps.append(step)
            if fmt not in KEPT_FORMATS:
                steps.append(f"format_{fmt.lower()}")
            if not steps:
                return {
                    "width": width,
                    "height": height,
                    "mode": original_mode,
                    "original_mode": original_mode,
                    "format": KEPT_FORMATS[fmt],
                    "normalized": None,
                    "normalized_bytes": None,
                }
            target = cfg.normalized_format
            if target == "auto":
                target = "jpg" if fmt == "JPEG" else "png"
            buf = io.BytesIO()
            if target == "jpg":
                if out.mode not in ("RGB", "L"):
                    out = out.convert("RGB")
                out.save(buf, "JPEG", quality=cfg.jpeg_quality)
            else:
                out.save(buf, "PNG")
            return {
                "width": out.width,
                "height": out.height,
                "mode": out.mode,
                "original_mode": original_mode,
                "format": target,
                "normalized": ",".join(steps),
                "normalized_bytes": buf.getvalue(),
            }


def _iter_tar_images(f, wanted: dict[str, int]):
    """Yield ``(key, member name, bytes)`` for the image members of ``wanted`` keys."""
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if ext in ("json", "txt") or key not in wanted:
                continue
            yield key, member.name, tar.extractfile(member).read()


class ValidateStage(Stage):
    """Decode, filter and normalise the downloaded images of a partition."""

    name = VALIDATE
    version = "1"
    inputs = (DOWNLOAD,)

    def __init__(self, settings: ValidateConfig | None = None):
        self.settings = settings or ValidateConfig()

    def params(self) -> dict[str, Any]:
        return self.settings.model_dump(mode="json")

    def run(self, ctx: StageContext) -> StageResult:
        root, cfg = ctx.root, self.settings
        downloads = ctx.read_input(DOWNLOAD, columns=["uid", "status", "tar", "key"])
        downloads = downloads.filter(pc.equal(downloads["status"], "success"))
        by_tar: dict[str, dict[str, int]] = defaultdict(dict)
        for uid, tar_rel, key in zip(
            downloads.column("uid").to_pylist(),
            downloads.column("tar").to_pylist(),
            downloads.column("key").to_pylist(),
            strict=True,
        ):
            by_tar[tar_rel][key] = uid

        fp = partition_fingerprint(root, self, ctx.partition)
        side = ctx.side_dir
        norm_name = f"normalized-{fp[:16]}.tar"
        norm_rel = posixpath.relpath(posixpath.join(side, norm_name), root.path)
        if root.exists(side):  # tars of earlier (now stale) runs
            for path in root.fs.ls(side, detail=False):
                if posixpath.basename(path) != norm_name:
                    root.remove(path, recursive=True)

        local_tar = ctx.scratch / norm_name
        kept: list[dict[str, Any]] = []
        removed: list[tuple[int, str, str]] = []
        n_normalized = 0
        with tarfile.open(local_tar, "w", format=tarfile.USTAR_FORMAT) as out_tar:
            for tar_rel in sorted(by_tar):
                wanted = by_tar[tar_rel]
                seen: set[str] = set()
                with root.fs.open(root.join(tar_rel), "rb") as f:
                    for key, member, data in _iter_tar_images(f, wanted):
                        seen.add(key)
                        uid = wanted[key]
                        try:
                            info = check_image(data, cfg)
                        except InvalidImage as exc:
                            removed.append((uid, exc.reason, exc.detail))
                            continue
                        final = info.pop("normalized_bytes")
                        row = {"uid": uid, **info}
                        if final is None:
                            row.update(tar=tar_rel, key=key, member=member)
                        else:
                            n_normalized += 1
                            new_key = f"{uid:016x}"
                            new_member = f"{new_key}.{info['format']}"
                            ti = tarfile.TarInfo(new_member)
                            ti.size, ti.mtime, ti.mode = len(final), 0, 0o444
                            out_tar.addfile(ti, io.BytesIO(final))
                            row.update(tar=norm_rel, key=new_key, member=new_member)
                            data = final
                        row["sha256"] = hashlib.sha256(data).hexdigest()
                        row["bytes"] = len(data)
                        kept.append(row)
                for key in sorted(set(wanted) - seen):
                    removed.append((wanted[key], "unreadable", f"key {key} missing from {tar_rel}"))
        if n_normalized:
            root.put_file(str(local_tar), root.join(norm_rel))

        kept.sort(key=lambda r: r["uid"])
        removed.sort()
        output = pa.Table.from_pylist(kept, VALIDATED)
        removed_t = pa.table(
            {
                "uid": pa.array([r[0] for r in removed], pa.uint64()),
                "reason": pa.array([r[1] for r in removed], pa.string()),
                "detail": pa.array([dumps_detail(error=r[2]) for r in removed], pa.string()),
            }
        )
        counts = {
            "downloaded": downloads.num_rows,
            "valid": len(kept),
            "invalid": len(removed),
            "normalized": n_normalized,
        }
        return StageResult(output=output, removed=removed_t, counts=counts)
