"""The training loader, and the shards read by open_clip's trainer and Hugging Face datasets."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from schemas.shard_config import ShardConfig
from storage.root import DatasetRoot
from tasks.loader import (
    CLIP_MEAN,
    CLIP_STD,
    RSImageTransform,
    make_loader,
    normalize_on_device,
    random_resized_box,
    resolve_urls,
)
from tasks.shard import SHARD_INPUT, Manifest, write_shards

torch.set_num_threads(1)
PROJECT = Path(__file__).resolve().parents[1]


def _photo(i: int, size: tuple[int, int], fmt: str, mode: str = "RGB") -> bytes:
    """A smooth image (gradients + a few shapes), so that resampling differences stay small."""
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    phase = np.array([0.0, 2.0, 4.0])[None, None, :] + i
    arr = (127 + 120 * np.sin(3 * x + 2 * y + phase)).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[DatasetRoot, Manifest]:
    tmp = tmp_path_factory.mktemp("loader")
    rows = []
    for i in range(24):
        fmt = ("jpg", "png", "webp", "jpg")[i % 4]
        mode = "L" if i == 5 else "RGB"
        size = (300 + 17 * i, 200 + 11 * i) if i % 2 else (90 + i, 140)
        p = tmp / f"img{i}.{fmt}"
        p.write_bytes(_photo(i, size, fmt, mode))
        rows.append(
            {
                "uid": 0x1000 + i,
                "source": "aid",
                "partition": "x",
                "caption": f"an aerial image of scene {i}",
                "tar": None,
                "member": None,
                "path": str(p),
                "sha256": None,
                "info": json.dumps(
                    {
                        "places": [{"name": "Paris", "country_code": "FR", "lat": 1.0, "lon": 2.0}],
                        "scores": {"rs_prob": 0.5},
                        "metadata": {"width": size[0], "height": size[1]},
                    }
                ),
            }
        )
    root = DatasetRoot(tmp / "root")
    table = pa.Table.from_pylist(rows, schema=SHARD_INPUT)
    manifest = write_shards(
        root, {"rs3": table}, ShardConfig(samples_per_shard=6, val_ratio=0.25, split_salt="t")
    )
    return root, manifest


def _all(loader) -> tuple[torch.Tensor, list[str]]:
    images, texts = [], []
    for x, t in loader:
        images.append(x)
        texts.extend(t)
    return torch.cat(images), texts


def test_resolve_urls(shards):
    root, manifest = shards
    assert resolve_urls(root.path, split="train") == manifest.urls("rs3", "train")
    assert resolve_urls(root.path, split=None) == manifest.urls()
    assert resolve_urls(manifest.directory, branch="pub11") == []
    pattern = manifest.brace_url("rs3", "train")
    assert resolve_urls(pattern) == pattern and "{0000.." in pattern


def test_loader_yields_normalised_batches(shards):
    root, manifest = shards
    n = manifest.total("rs3", "train")
    loader = make_loader(root.path, batch_size=4, workers=0, shuffle_buffer=8, image_size=32)
    images, texts = _all(loader)
    assert images.shape == (n, 3, 32, 32) and images.dtype == torch.float32
    assert len(texts) == n and all(t.startswith("an aerial image of scene") for t in texts)
    assert len(set(texts)) == n  # every sample exactly once per epoch
    lo = (0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    hi = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert images.amin() >= lo.min() - 1e-4 and images.amax() <= hi.max() + 1e-4


def test_loader_is_reproducible_and_uint8_mode(shards):
    root, _ = shards
    kw = dict(batch_size=5, workers=0, shuffle_buffer=10, image_size=24, seed=3)
    a, ta = _all(make_loader(root.path, **kw))
    b, tb = _all(make_loader(root.path, **kw))
    assert ta == tb and torch.equal(a, b)
    c, tc = _all(make_loader(root.path, **kw, normalize=False))
    assert c.dtype == torch.uint8 and tc == ta
    torch.testing.assert_close(normalize_on_device(c), a)
    d, td = _all(make_loader(root.path, **{**kw, "seed": 4}))
    assert td != ta or not torch.equal(d, a)


def test_loader_with_workers_reads_each_sample_once(shards):
    root, manifest = shards
    loader = make_loader(root.path, batch_size=3, workers=2, shuffle_buffer=4, image_size=16)
    _, texts = _all(loader)
    assert sorted(texts) == sorted(set(texts)) and len(texts) == manifest.total("rs3", "train")


def test_resampled_epochs_and_tokenizer(shards):
    import open_clip

    root, _ = shards
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    loader = make_loader(
        root.path,
        batch_size=4,
        workers=0,
        shuffle_buffer=4,
        image_size=16,
        resampled=True,
        epoch_batches=5,
        tokenizer=tokenizer,
    )
    batches = list(loader)
    assert len(batches) == 5
    assert all(x.shape == (4, 3, 16, 16) and t.shape == (4, 77) for x, t in batches)


def test_eval_transform_matches_clip_reference(shards):
    """augment=False equals Resize(short side, bicubic) + CenterCrop, up to JPEG draft noise."""
    from torchvision import transforms as T

    ref = T.Compose(
        [
            T.Resize(64, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(64),
            T.PILToTensor(),
        ]
    )
    ours = RSImageTransform(64, augment=False)
    for fmt, size in (("jpg", (400, 300)), ("png", (300, 500)), ("webp", (64, 90))):
        data = _photo(1, size, fmt)
        a = ours(data).float()
        b = ref(Image.open(io.BytesIO(data)).convert("RGB")).float()
        assert a.shape == b.shape == (3, 64, 64)
        assert (a - b).abs().mean() < 4.0, fmt  # of 255


def test_augmentations_are_square_and_cover_d4():
    t = RSImageTransform(16, augment=True, seed=1)
    data = _photo(0, (64, 48), "png")
    outs = {t(data).numpy().tobytes() for _ in range(64)}
    assert len(outs) > 8
    rng = random.Random(0)
    for _ in range(200):
        box = random_resized_box(300, 120, rng, (0.5, 1.0), (3 / 4, 4 / 3))
        assert 0 <= box[0] < box[2] <= 300 and 0 <= box[1] < box[3] <= 120
    assert len(t.choices) == 8
    assert RSImageTransform(16, augment=False).choices == (0,)
    assert sorted(RSImageTransform(16, rotate90=True, hflip=False, vflip=False).choices) == [
        0,
        3,
        4,
        5,
    ]


def test_open_clip_get_wds_dataset_reads_shards(shards):
    """open_clip_train's own webdataset pipeline (sizes.json gives the sample count)."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    _, manifest = shards
    preprocess = open_clip.image_transform(32, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    args = Namespace(
        train_data=manifest.brace_url("rs3", "train"),
        val_data=None,
        train_num_samples=None,
        train_data_upsampling_factors=None,
        dataset_resampled=False,
        seed=0,
        batch_size=4,
        world_size=1,
        workers=0,
    )
    info = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    n = 0
    for images, texts in info.dataloader:
        assert images.shape[1:] == (3, 32, 32) and texts.shape[1] == 77
        n += images.shape[0]
    assert n >= manifest.total("rs3", "train")


def test_huggingface_datasets_webdataset_loader(shards, tmp_path):
    """``datasets.load_dataset(<shard folder>, <branch>)``: HF's webdataset builder, with the
    features declared in the folder's dataset card (mixed jpg/png/webp and the full JSON)."""
    datasets = pytest.importorskip("datasets")
    _, manifest = shards
    ds = datasets.load_dataset(manifest.directory, "rs3", cache_dir=str(tmp_path / "hf"))
    assert ds["train"].num_rows == manifest.total("rs3", "train")
    assert ds["validation"].num_rows == manifest.total("rs3", "val")
    for split in ("train", "validation"):
        for row in ds[split]:
            images = [row[k] for k in ("jpg", "png", "webp") if row[k] is not None]
            assert len(images) == 1 and images[0].size[0] > 0  # no image type dropped
            assert row["txt"].startswith("an aerial image")
            meta = row["json"]
            assert meta["places"][0]["country_code"] == "FR"
            assert meta["scores"]["rs_prob"] == 0.5 and meta["metadata"]["width"] > 0
            assert meta["uid"] == row["__key__"]


@pytest.mark.slow
def test_open_clip_trainer_trains_one_epoch(shards, tmp_path):
    """``python -m open_clip_train.main --dataset-type webdataset`` on the tiny model."""
    _, manifest = shards
    n = manifest.total("rs3", "train")
    code = (
        "import sys, open_clip, open_clip_train.main as m;"
        "from tasks.embed import register_model_configs; register_model_configs();"
        "m.main(sys.argv[1:])"
    )
    cmd = [
        sys.executable,
        "-c",
        code,
        "--train-data",
        manifest.brace_url("rs3", "train"),
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(n),
        "--model",
        "rs5m-tiny-vit",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--lr",
        "1e-4",
        "--warmup",
        "1",
        "--logs",
        str(tmp_path / "logs"),
        "--name",
        "wds-smoke",
        "--report-to",
        "",
        "--log-every-n-steps",
        "1",
    ]
    env = {
        **__import__("os").environ,
        "PYTHONPATH": str(PROJECT),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (tmp_path / "logs" / "wds-smoke" / "out.log").read_text()
    assert "Train Epoch: 0" in log
    assert (tmp_path / "logs" / "wds-smoke" / "checkpoints" / "epoch_1.pt").exists()
