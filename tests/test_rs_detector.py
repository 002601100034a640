"""The remote-sensing detector: training, held-out metrics, file format, backbone check."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.rs_detector import (
    BackboneMismatch,
    Detector,
    binary_metrics,
    choose_threshold,
    detector_sha256,
    split_by_file,
    train_detector,
)

BACKBONE = "rs5m-tiny-vit@sha256:" + "a" * 64
OTHER = "ViT-B-32@laion2b_s34b_b79k"


def _blobs(n_pos: int = 120, n_neg: int = 80, dim: int = 16, shift: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    pos = rng.normal(size=(n_pos, dim)).astype(np.float32)
    pos[:, 0] += shift
    neg = rng.normal(size=(n_neg, dim)).astype(np.float32)
    return pos, neg


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


def test_split_by_file_keeps_files_whole_and_is_stratified():
    labels = np.array([1] * 40 + [0] * 20)
    groups = np.repeat(np.arange(30), 2).astype(str)  # two crops per file
    strata = np.array(["a"] * 20 + ["b"] * 20 + ["n"] * 20)
    train, test = split_by_file(labels, groups, strata, test_fraction=0.25, seed=3)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 60
    assert not set(groups[train]) & set(groups[test])  # no file on both sides
    assert {"a", "b", "n"} <= set(strata[test].tolist())
    again = split_by_file(labels, groups, strata, test_fraction=0.25, seed=3)
    assert np.array_equal(again[1], test)
    other = split_by_file(labels, groups, strata, test_fraction=0.25, seed=4)
    assert not np.array_equal(other[1], test)
    with pytest.raises(ValueError, match="different labels"):
        split_by_file(np.array([0, 1]), np.array(["f", "f"]))


def test_train_metrics_and_round_trip(tmp_path: Path):
    pos, neg = _blobs()
    det = train_detector(pos, neg, BACKBONE, seed=0)
    m = det.metrics
    assert m["n_train"] + m["n_test"] == 200
    assert m["n_test_pos"] + m["n_test_neg"] == m["n_test"] == 50
    assert 0.8 < m["roc_auc"] <= 1.0
    for key in ("precision", "recall", "specificity", "cv_roc_auc"):
        assert 0.0 <= m[key] <= 1.0
    assert 0.0 < det.threshold < 1.0 and m["threshold"] == pytest.approx(det.threshold)
    assert det.backbone == BACKBONE and det.created_at

    path = tmp_path / "det" / "rs.npz"
    sha = det.save(path)
    assert sha == detector_sha256(path)
    # A plain npz: loads without pickle, with a JSON header.
    with np.load(path, allow_pickle=False) as npz:
        header = json.loads(str(npz["header"]))
    assert header["backbone"] == BACKBONE and header["metrics"]["roc_auc"] == m["roc_auc"]

    back = Detector.load(path, expected_backbone=BACKBONE)
    x = np.concatenate([pos, neg])
    np.testing.assert_allclose(back.predict_proba(x), det.predict_proba(x), rtol=1e-6)
    assert back.threshold == det.threshold and back.metrics == det.metrics
    assert np.array_equal(back.predict(x), det.predict_proba(x) >= det.threshold)


def test_backbone_mismatch_names_both(tmp_path: Path):
    pos, neg = _blobs(30, 30, dim=8)
    path = tmp_path / "rs.npz"
    train_detector(pos, neg, BACKBONE, cv_folds=3).save(path)
    with pytest.raises(BackboneMismatch) as info:
        Detector.load(path, expected_backbone=OTHER)
    assert BACKBONE in str(info.value) and OTHER in str(info.value)
    assert "train-detector" in str(info.value)
    assert Detector.load(path, expected_backbone=None).backbone == BACKBONE  # inspection
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        Detector.load(path, BACKBONE).predict_proba(np.zeros((2, 4), np.float32))


def test_not_a_detector_file(tmp_path: Path):
    bad = tmp_path / "x.npz"
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(3))
    bad.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not a remote-sensing detector"):
        Detector.load(bad, BACKBONE)


def test_mlp_head_matches_after_reload(tmp_path: Path):
    pos, neg = _blobs(60, 60, dim=8, shift=2.0)
    det = train_detector(pos, neg, BACKBONE, kind="mlp", hidden=(16,), cv_folds=2, max_iter=300)
    assert len(det.weights) == 2 and det.metrics["roc_auc"] > 0.8
    det.save(tmp_path / "mlp.npz")
    back = Detector.load(tmp_path / "mlp.npz", BACKBONE)
    x = np.concatenate([pos, neg])
    np.testing.assert_allclose(back.predict_proba(x), det.predict_proba(x), rtol=1e-6)


def test_augmented_views_train_only():
    pos, neg = _blobs(40, 30, dim=8)
    rng = np.random.default_rng(1)
    aug_pos = pos[:, None, :] + rng.normal(scale=0.1, size=(40, 3, 8)).astype(np.float32)
    aug_neg = neg[:, None, :] + rng.normal(scale=0.1, size=(30, 3, 8)).astype(np.float32)
    det = train_detector(pos, neg, BACKBONE, augment_pos=aug_pos, augment_neg=aug_neg, c=0.1)
    m = det.metrics
    assert m["n_train"] + m["n_test"] == 70  # files; the metrics are on whole images
    assert m["n_train_rows"] == 4 * m["n_train"] and det.params["augmented_views"] == 3
    with pytest.raises(ValueError, match="together"):
        train_detector(pos, neg, BACKBONE, augment_pos=aug_pos)
    with pytest.raises(ValueError, match="do not match"):
        train_detector(pos, neg, BACKBONE, augment_pos=aug_pos[:5], augment_neg=aug_neg)


def test_embed_files_with_crops(tmp_path: Path):
    from PIL import Image

    from tasks.rs_detector import embed_files

    class MeanColour:  # a stand-in embedder: mean RGB and size
        dim = 4

        def embed_images(self, images):
            return np.array(
                [[*np.asarray(im, np.float32).mean((0, 1)), im.size[0]] for im in images],
                np.float32,
            )

    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((40, 60, 3), 50 * i, np.uint8)).save(p)
        paths.append(str(p))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    x, ok, bad, crops = embed_files(MeanColour(), [*paths, str(tmp_path / "bad.jpg")], 2, 2)
    assert x.shape == (3, 4) and ok == paths and bad == [str(tmp_path / "bad.jpg")]
    assert crops.shape == (3, 2, 4)
    assert (crops[:, :, 3] <= 60).all() and (crops[:, :, 3] >= 60 * np.sqrt(0.3) - 1).all()
    np.testing.assert_allclose(crops[:, :, 0], np.repeat(x[:, :1], 2, axis=1))  # right file
    again = embed_files(MeanColour(), paths[::-1], 2, 2)[3][::-1]
    np.testing.assert_array_equal(again, crops)  # seeded by path, not by order


def test_threshold_methods():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    assert choose_threshold(y, p, "youden") == pytest.approx(0.7)  # TPR .75, FPR 0
    assert choose_threshold(y, p, "recall", 1.0) == pytest.approx(0.4)
    assert choose_threshold(y, p, "precision", 1.0) == pytest.approx(0.7)
    m = binary_metrics(y, p, 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 3)
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)
    assert m["roc_auc"] == pytest.approx(15 / 16)


def test_fixture_detector_held_out(fixtures_dir: Path, tmp_path: Path):
    """Tiny random backbone, EuroSAT + AID against natural photos, split by file."""
    import torch

    from tasks.embed import TINY_MODEL, ClipEmbedder, create_random_checkpoint
    from tasks.rs_detector import list_images, train_detector_from_folders

    torch.set_num_threads(1)
    ckpt = create_random_checkpoint(TINY_MODEL, str(tmp_path / "tiny.pt"), seed=0)
    embedder = ClipEmbedder(TINY_MODEL, checkpoint=ckpt, batch_size=128)
    pos_dirs = [str(fixtures_dir / "eurosat_rgb"), str(fixtures_dir / "aid_150px")]
    neg_dirs = [str(fixtures_dir / "natural_photos")]
    out = tmp_path / "rs_detector.npz"
    det, sha = train_detector_from_folders(embedder, pos_dirs, neg_dirs, str(out), seed=0)
    m = det.metrics
    n_files = sum(len(list_images(d)) for d in pos_dirs + neg_dirs)
    assert m["n_train"] + m["n_test"] == n_files
    assert m["n_test_neg"] >= 20 and set(m["by_stratum"]) == {
        "eurosat_rgb",
        "aid_150px",
        "natural_photos",
    }
    # Measured 0.92 (seed 0); random weights, so the bound leaves room.
    assert m["roc_auc"] > 0.8, m
    assert m["by_stratum"]["eurosat_rgb"]["roc_auc"] > 0.85
    assert sha == detector_sha256(out)
    assert Detector.load(out, embedder.identity).threshold == det.threshold
    with pytest.raises(BackboneMismatch):
        Detector.load(out, "rs5m-tiny-vit@sha256:" + "0" * 64)


@pytest.mark.slow
def test_train_detector_flow(fixtures_dir: Path, tmp_path: Path):
    """Through Prefect: the flow saves the detector and publishes its metrics."""
    import os

    from prefect.testing.utilities import prefect_test_harness

    from flows.train_detector import train_detector_flow
    from tasks.embed import TINY_MODEL, create_random_checkpoint

    pos, neg = tmp_path / "rs", tmp_path / "other"
    pos.mkdir()
    neg.mkdir()
    for p in sorted((fixtures_dir / "eurosat_rgb").rglob("*.jpg"))[::25]:
        os.symlink(p, pos / p.name)
    for p in sorted((fixtures_dir / "natural_photos" / "imagenet").glob("*.JPEG"))[:40]:
        os.symlink(p, neg / p.name)
    ckpt = create_random_checkpoint(TINY_MODEL, str(tmp_path / "tiny.pt"), seed=0)
    out = str(tmp_path / "det.npz")
    with prefect_test_harness(server_startup_timeout=90):
        result = train_detector_flow(
            [str(pos)], [str(neg)], out, model_name=TINY_MODEL, checkpoint=ckpt
        )
        from prefect.artifacts import Artifact

        table = json.loads(Artifact.get("rs-detector-metrics").data)
        assert {"metric": "roc_auc", "value": result["roc_auc"]} in table
    assert result["path"] == out and result["sha256"] == detector_sha256(out)
    assert result["n_train"] + result["n_test"] == 80
    assert 0.0 <= result["roc_auc"] <= 1.0
