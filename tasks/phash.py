"""64-bit perceptual hashes (pHash) of images read from tar shards.

The hash is ``imagehash.phash`` (grey, 32x32 Lanczos, 2-D DCT, the 8x8 low frequencies against
their median), stored as an unsigned 64-bit integer whose most significant bit is the first bit
of imagehash's bit array (``int(str(imagehash.phash(im)), 16)``).

Two decoding paths:

- ``"imagehash"``: the image is decoded at full size, then hashed (the reference).
- ``"fast"``: a JPEG is decoded with libjpeg's DCT scaling (``Image.draft``) straight to the
  smallest size of at least ``draft_size`` pixels a side (1/2, 1/4 or 1/8 of the original), then
  hashed the same way; other formats take the reference path. On large JPEGs this is several
  times faster; the hashes agree with the reference exactly for most images and within 2 bits
  for nearly all (``bench/dedup.py`` measures it; numbers in ``bench/README_dedup.md``). A
  dataset must use one path throughout: the method is part of the features fingerprint.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import imagehash
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
DEFAULT_DRAFT_SIZE = 128

Method = Literal["imagehash", "fast"]


def hash_to_int(h: imagehash.ImageHash) -> int:
    """imagehash's bit array as an unsigned 64-bit integer (first bit most significant)."""
    bits = np.asarray(h.hash, dtype=bool).reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_image(image: Image.Image) -> int:
    """The reference pHash of a decoded image: exactly ``imagehash.phash``."""
    return hash_to_int(imagehash.phash(image))


def open_image(data: bytes, method: Method = "fast", draft_size: int = DEFAULT_DRAFT_SIZE):
    """Open image bytes for hashing; ``fast`` lets libjpeg decode a JPEG at a reduced size."""
    image = Image.open(io.BytesIO(data))
    if method == "fast" and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    return image


def phash_bytes(data: bytes, method: Method = "fast", draft_size: int = DEFAULT_DRAFT_SIZE) -> int:
    """pHash of encoded image bytes (JPEG, PNG, WebP, ...)."""
    image = open_image(data, method, draft_size)
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    return phash_image(image)


def hamming(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()


def hashes_to_codes(hashes: Iterable[int] | np.ndarray) -> np.ndarray:
    """uint64 hashes as ``(n, 8)`` uint8 codes for a FAISS binary index (big-endian bytes)."""
    arr = np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64))
    return arr.astype(">u8").view(np.uint8).reshape(-1, 8)


def codes_to_hashes(codes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(codes, dtype=np.uint8).view(">u8").reshape(-1).astype(np.uint64)


def member_key(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``)."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        return name, ""
    return stem, ext.lower()


def iter_tar_images(
    fs: Any, path: str, keys: Iterable[str] | None = None
) -> Iterator[tuple[str, bytes]]:
    """Stream ``(key, bytes)`` of the image members of one tar shard on any fsspec filesystem.

    ``key`` is the member name without its extension (img2dataset's ``key``). Only image members
    are returned, only those in ``keys`` when given; the tar is read once, sequentially, so it
    works on object stores without random access.
    """
    wanted = None if keys is None else set(keys)
    with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = member_key(member.name)
            if ext not in IMAGE_EXTENSIONS:
                continue
            if wanted is not None:
                if key not in wanted:
                    base = posixpath.basename(key)
                    if base not in wanted:
                        continue
                    key = base
                wanted.discard(key)
            f = tar.extractfile(member)
            if f is None:
                continue
            yield key, f.read()
            if wanted is not None and not wanted:
                return


def iter_tar_members(fs: Any, path: str, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """Stream ``(member name, bytes)`` of the named members of one tar shard (read once)."""
    wanted = set(names)
    if not wanted:
        return
    with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            if member.name not in wanted or not member.isfile():
                continue
            f = tar.extractfile(member)
            if f is None:
                continue
            wanted.discard(member.name)
            yield member.name, f.read()
            if not wanted:
                return
