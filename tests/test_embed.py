"""open_clip embeddings: a tiny random checkpoint loads through the real checkpoint path."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.dedup_config import EmbedConfig
from tasks.embed import (
    TINY_MODEL,
    CheckpointNotFoundError,
    ClipEmbedder,
    create_random_checkpoint,
    register_model_configs,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    return create_random_checkpoint(TINY_MODEL, str(tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 80, 3), np.uint8)) for _ in range(n)]


def test_register_configs_is_idempotent():
    import open_clip

    assert TINY_MODEL in register_model_configs()
    register_model_configs()
    assert TINY_MODEL in open_clip.list_models()


def test_embeds_normalised_float32(tiny_checkpoint):
    emb = ClipEmbedder(TINY_MODEL, checkpoint=tiny_checkpoint, batch_size=4)
    assert emb.dim == 64
    images = _images(10)
    images[3] = images[3].convert("L")  # grey images are converted
    x = emb.embed_images(images)
    assert x.shape == (10, 64) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    t = emb.embed_texts(["an aerial view of a harbour", "farmland", None, ""])
    assert t.shape == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert emb.embed_images([]).shape == (0, 64)
    # Batching does not change the result.
    one = ClipEmbedder(TINY_MODEL, checkpoint=tiny_checkpoint, batch_size=64)
    np.testing.assert_allclose(one.embed_images(images), x, atol=1e-5)


def test_checkpoint_weights_are_really_loaded(tiny_checkpoint, tmp_path):
    other = create_random_checkpoint(TINY_MODEL, str(tmp_path / "other.pt"), seed=1)
    a = ClipEmbedder(TINY_MODEL, checkpoint=tiny_checkpoint)
    a2 = ClipEmbedder(TINY_MODEL, pretrained=tiny_checkpoint)  # a path given as `pretrained`
    b = ClipEmbedder(TINY_MODEL, checkpoint=other)
    images = _images(3)
    np.testing.assert_allclose(a.embed_images(images), a2.embed_images(images), atol=1e-6)
    assert not np.allclose(a.embed_images(images), b.embed_images(images), atol=1e-3)
    assert a.identity == a2.identity != b.identity
    assert a.identity.startswith(f"{TINY_MODEL}@sha256:")


def test_missing_checkpoint_says_how_to_provide_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="create-random-checkpoint"):
        ClipEmbedder(TINY_MODEL, checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointNotFoundError, match="never used silently"):
        ClipEmbedder(TINY_MODEL)


def test_pretrained_tag_offline_fails_fast(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE"):
        ClipEmbedder("ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(CheckpointNotFoundError, match="nor a known pretrained tag"):
        ClipEmbedder("ViT-B-32", pretrained="no-such-tag")
    assert time.monotonic() - started < 10


def test_from_config_and_cuda_unavailable(tiny_checkpoint):
    cfg = EmbedConfig(model_name=TINY_MODEL, pretrained=None, checkpoint=tiny_checkpoint)
    assert ClipEmbedder.from_config(cfg).dim == 64
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            ClipEmbedder(TINY_MODEL, checkpoint=tiny_checkpoint, device="cuda")


@pytest.mark.skipif(not os.environ.get("RS5M_TEST_CUDA"), reason="set RS5M_TEST_CUDA=1 on a GPU")
def test_cuda_matches_cpu(tiny_checkpoint):
    images = _images(8)
    cpu = ClipEmbedder(TINY_MODEL, checkpoint=tiny_checkpoint).embed_images(images)
    gpu = ClipEmbedder(TINY_MODEL, checkpoint=tiny_checkpoint, device="cuda").embed_images(images)
    assert np.min(np.sum(cpu * gpu, axis=1)) > 0.999
