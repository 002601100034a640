"""pHash: equal to imagehash, the draft-mode path's agreement, reading images from tar shards."""

from __future__ import annotations

import io
import tarfile

import imagehash
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from tasks.phash import (
    codes_to_hashes,
    hamming,
    hash_to_int,
    hashes_to_codes,
    iter_tar_images,
    iter_tar_members,
    phash_bytes,
    phash_image,
)


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_int_is_imagehash_hex():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8))
    h = imagehash.phash(image)
    assert hash_to_int(h) == int(str(h), 16) == phash_image(image)
    assert 0 <= phash_image(image) < 2**64
    assert hamming(0b1011, 0b0001) == 2


def test_codes_round_trip():
    hashes = np.array([0, 1, 2**63, 2**64 - 1, 0x0123456789ABCDEF], np.uint64)
    codes = hashes_to_codes(hashes)
    assert codes.shape == (5, 8) and codes[4, 0] == 0x01  # most significant byte first
    np.testing.assert_array_equal(codes_to_hashes(codes), hashes)


def test_reference_path_equals_imagehash(fixtures_dir):
    for path in sorted((fixtures_dir / "aid_150px").glob("*/*.jpg"))[:20]:
        data = path.read_bytes()
        assert phash_bytes(data, "imagehash") == hash_to_int(imagehash.phash(Image.open(path)))


def test_fast_path_agrees_with_imagehash(fixtures_dir):
    """Draft-mode decoding changes a few hashes by a bit or two (bench/README_dedup.md)."""
    files = sorted((fixtures_dir / "natural_photos" / "imagenet").glob("*.JPEG"))[:40]
    if not files:
        pytest.skip("no ImageNet fixture photos")
    dist = []
    for path in files:
        big = Image.open(path).convert("RGB")
        big = big.resize((big.width * 2, big.height * 2))
        data = _jpeg(big)
        dist.append(hamming(phash_bytes(data, "imagehash"), phash_bytes(data, "fast")))
    dist = np.array(dist)
    assert np.mean(dist == 0) >= 0.6
    assert np.mean(dist <= 2) >= 0.95
    assert dist.max() <= 6
    # Non-JPEG images take the reference path: identical.
    png = io.BytesIO()
    Image.open(files[0]).save(png, "PNG")
    assert phash_bytes(png.getvalue(), "fast") == phash_bytes(png.getvalue(), "imagehash")


def test_reads_images_from_tar(tmp_path):
    rng = np.random.default_rng(1)
    members = {}
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for k, ext in enumerate(["jpg", "png", "webp", "jpg"]):
            image = Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8))
            buf = io.BytesIO()
            image.save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
            for name, data in ((f"{k:05d}.{ext}", buf.getvalue()), (f"{k:05d}.txt", b"cap")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                members[name] = data
    fs = LocalFileSystem()
    got = dict(iter_tar_images(fs, str(path)))
    assert sorted(got) == ["00000", "00001", "00002", "00003"]  # captions skipped
    assert got["00001"] == members["00001.png"]
    assert dict(iter_tar_images(fs, str(path), ["00002"])) == {"00002": members["00002.webp"]}
    exact = dict(iter_tar_members(fs, str(path), ["00003.jpg", "00000.txt"]))
    assert exact == {"00003.jpg": members["00003.jpg"], "00000.txt": b"cap"}
