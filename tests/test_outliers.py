"""Outlier removal: scores, thresholds, rules, and the stage over a real dataset root."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pydantic
import pytest

from schemas.outliers_config import OutliersConfig
from schemas.tables import DECISIONS, DEDUP, FEATURES, FEATURES_TABLE, OUTLIERS
from storage.root import DatasetRoot
from storage.stage import Partition, Stage, StageContext, StageResult, run_partition
from tasks.outliers import (
    LOW_CLIP,
    MISSING,
    NOT_RS,
    OutliersStage,
    clip_cut,
    clip_scores,
    embeddings_to_numpy,
    outlier_mask,
    score_features,
    score_samples,
)
from tasks.rs_detector import BackboneMismatch, Detector

BACKBONE = "rs5m-tiny-vit@sha256:" + "b" * 64
DIM = 4


def make_embeddings(clip: np.ndarray, rs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings whose cosine is exactly ``clip``; the image's second
    coordinate is sin(t) with sin(t) = ``rs`` (what :func:`toy_detector` reads)."""
    clip = np.asarray(clip, np.float64)
    rs = np.asarray(rs, np.float64)
    n = len(clip)
    img = np.zeros((n, DIM))
    img[:, 0] = np.sqrt(1 - rs**2)
    img[:, 1] = rs
    txt = clip[:, None] * img
    txt[:, 2] = np.sqrt(1 - clip**2)
    return img.astype(np.float32), txt.astype(np.float32)


def toy_detector(threshold: float = 0.5, backbone: str = BACKBONE) -> Detector:
    """rs_prob = sigmoid(20 * (x1 - 0.5)): above 0.5 exactly when the coordinate is."""
    w = np.zeros((DIM, 1), np.float32)
    w[1, 0] = 20.0
    return Detector(
        kind="logreg",
        backbone=backbone,
        mean=np.zeros(DIM, np.float32),
        scale=np.ones(DIM, np.float32),
        weights=(w,),
        biases=(np.array([-10.0], np.float32),),
        threshold=threshold,
        metrics={"roc_auc": 1.0},
    )


# Four samples: (good caption, RS), (bad caption, RS), (good caption, not RS), (bad, not RS).
CLIP = np.array([0.5, 0.1, 0.5, 0.1])
RS = np.array([0.9, 0.9, 0.1, 0.1])


def test_embeddings_to_numpy_with_nulls():
    col = pa.chunked_array(
        [
            pa.array([[1, 0], None], pa.list_(pa.float16())),
            pa.array([[0.5, 0.5], []], pa.list_(pa.float16())),
        ]
    )
    x, valid = embeddings_to_numpy(col)
    assert x.dtype == np.float32 and x.shape == (4, 2)
    assert valid.tolist() == [True, False, True, False]
    assert x[2].tolist() == [0.5, 0.5] and not x[1].any()


def test_clip_scores_are_cosines():
    img, txt = make_embeddings(CLIP, RS)
    np.testing.assert_allclose(clip_scores(img, txt), CLIP, atol=1e-6)
    np.testing.assert_allclose(clip_scores(img * 3, txt), CLIP, atol=1e-6)  # re-normalised


@pytest.mark.parametrize(
    ("rule", "keep"),
    [
        ("clip", [True, False, True, False]),
        ("detector", [True, True, False, False]),
        ("either", [True, False, False, False]),
        ("both", [True, True, True, False]),
    ],
)
def test_rules(rule: str, keep: list[bool]):
    img, txt = make_embeddings(CLIP, RS)
    cfg = OutliersConfig(rule=rule, clip_threshold=0.3, detector_path="unused.npz")
    s = score_samples(np.arange(4, dtype=np.uint64), img, txt, cfg, toy_detector())
    assert s.decisions.schema == DECISIONS
    assert s.decisions.column("keep").to_pylist() == keep
    np.testing.assert_allclose(s.decisions.column("clip_score").to_numpy(), CLIP, atol=1e-6)
    prob = s.decisions.column("rs_prob").to_numpy()
    assert (prob[:2] > 0.5).all() and (prob[2:] < 0.5).all()
    assert s.counts["kept"] + s.counts["outliers"] == s.counts["scored"] == 4
    assert s.counts["low_clip_score"] == 2 and s.counts["not_remote_sensing"] == 2
    assert s.removed.num_rows == keep.count(False)
    expected = {
        "clip": {1: LOW_CLIP, 3: LOW_CLIP},
        "detector": {2: NOT_RS, 3: NOT_RS},
        "either": {1: LOW_CLIP, 2: NOT_RS, 3: f"{LOW_CLIP}+{NOT_RS}"},
        "both": {3: f"{LOW_CLIP}+{NOT_RS}"},
    }[rule]
    assert (
        dict(
            zip(
                s.removed.column("uid").to_pylist(),
                s.removed.column("reason").to_pylist(),
                strict=True,
            )
        )
        == expected
    )
    for detail, uid in zip(
        s.removed.column("detail").to_pylist(), s.removed.column("uid").to_pylist(), strict=True
    ):
        d = json.loads(detail)
        assert d["clip_score"] == pytest.approx(CLIP[uid], abs=1e-5)
        assert d["rs_prob"] == pytest.approx(float(prob[uid]), abs=1e-5)
        assert d["clip_threshold"] == 0.3 and d["detector_threshold"] == 0.5
        assert d["rule"] == rule
    kept_reasons = [
        r for r, k in zip(s.decisions.column("reason").to_pylist(), keep, strict=True) if k
    ]
    assert all(r is None for r in kept_reasons)


def test_clip_rule_without_detector_and_threshold_override():
    img, txt = make_embeddings(CLIP, RS)
    s = score_samples(np.arange(4, dtype=np.uint64), img, txt, OutliersConfig(clip_threshold=0.3))
    assert s.decisions.column("keep").to_pylist() == [True, False, True, False]
    assert s.decisions.column("rs_prob").null_count == 4
    assert json.loads(s.removed.column("detail")[0].as_py())["rs_prob"] is None
    # Overriding the detector's own threshold: a cut at 1e-4 keeps every image as RS.
    cfg = OutliersConfig(rule="detector", detector_path="x", detector_threshold=1e-4)
    s = score_samples(np.arange(4, dtype=np.uint64), img, txt, cfg, toy_detector(0.5))
    assert all(s.decisions.column("keep").to_pylist()) and s.detector_threshold == 1e-4
    with pytest.raises(ValueError, match="needs a detector"):
        score_samples(np.arange(4, dtype=np.uint64), img, txt, cfg, None)


def test_outlier_mask_truth_table():
    low = np.array([False, True, False, True])
    nrs = np.array([False, False, True, True])
    assert outlier_mask(low, nrs, "clip").tolist() == [False, True, False, True]
    assert outlier_mask(low, nrs, "detector").tolist() == [False, False, True, True]
    assert outlier_mask(low, nrs, "either").tolist() == [False, True, True, True]
    assert outlier_mask(low, nrs, "both").tolist() == [False, False, False, True]


def test_percentile_threshold_and_small_partition_fallback():
    scores = np.linspace(0.0, 0.99, 100)
    cfg = OutliersConfig(clip_threshold_mode="percentile", clip_percentile=10, clip_threshold=0.5)
    cut = clip_cut(scores, cfg)
    assert cut == pytest.approx(np.percentile(scores, 10))
    assert int((scores < cut).sum()) == 10
    assert clip_cut(scores[:20], cfg) == 0.5  # fewer than percentile_min_samples
    img, txt = make_embeddings(scores, np.full(100, 0.9))
    s = score_samples(np.arange(100, dtype=np.uint64), img, txt, cfg)
    assert s.counts["outliers"] == 10 and s.clip_threshold == pytest.approx(cut, abs=1e-6)
    assert json.loads(s.removed.column("detail")[0].as_py())["clip_threshold_mode"] == "percentile"


def test_config_validation():
    assert OutliersConfig().effective_rule == "clip"
    assert OutliersConfig(detector_path="d.npz").effective_rule == "either"
    for rule in ("detector", "either", "both"):
        with pytest.raises(pydantic.ValidationError, match="detector_path"):
            OutliersConfig(rule=rule)
    with pytest.raises(pydantic.ValidationError):
        OutliersConfig(clip_threshold_mode="per-source")
    with pytest.raises(pydantic.ValidationError):
        OutliersConfig(clip_threshld=0.2)


def test_empty_partition():
    t = pa.table(
        {
            "uid": pa.array([], pa.uint64()),
            "image_embedding": pa.array([], pa.list_(pa.float16())),
            "text_embedding": pa.array([], pa.list_(pa.float16())),
        }
    )
    cfg = OutliersConfig(rule="both", detector_path="x", clip_threshold_mode="percentile")
    s = score_features(t, cfg, toy_detector())
    assert s.decisions.num_rows == 0 and s.removed.num_rows == 0
    assert s.decisions.schema == DECISIONS and s.counts["scored"] == 0


def test_missing_embedding_is_removed_with_a_reason():
    img, txt = (a.astype(np.float16) for a in make_embeddings(CLIP[:2], RS[:2]))
    t = pa.table(
        {
            "uid": pa.array([7, 8, 9], pa.uint64()),
            "image_embedding": pa.array([img[0], None, img[1]], pa.list_(pa.float16())),
            "text_embedding": pa.array([txt[0], txt[1], txt[1]], pa.list_(pa.float16())),
        }
    )
    s = score_features(t, OutliersConfig(clip_threshold=0.3))
    assert s.decisions.column("keep").to_pylist() == [True, False, False]
    assert s.decisions.column("reason").to_pylist() == [None, MISSING, LOW_CLIP]
    assert s.counts["missing_embedding"] == 1


# -- the stage on a real dataset root ------------------------------------------------------------
N = 40


def _rows() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    clip = rng.uniform(0.0, 0.6, N)
    rs = rng.uniform(0.0, 1.0, N)
    img, txt = make_embeddings(clip, rs)
    return np.arange(1000, 1000 + N, dtype=np.uint64), img, txt, clip


class FakeFeatures(Stage):
    name = FEATURES
    version = "test"

    def run(self, ctx: StageContext) -> StageResult:
        uids, img, txt, _ = _rows()
        t = pa.table(
            {
                "uid": pa.array(uids, pa.uint64()),
                "phash": pa.array(uids, pa.uint64()),
                "image_embedding": pa.array(list(img.astype(np.float16)), pa.list_(pa.float16())),
                "text_embedding": pa.array(list(txt.astype(np.float16)), pa.list_(pa.float16())),
            },
            schema=FEATURES_TABLE,
        )
        return StageResult(output=t)


class FakeDedup(Stage):
    name = DEDUP
    version = "test"
    inputs = (FEATURES,)

    def run(self, ctx: StageContext) -> StageResult:
        uids = ctx.read_input(FEATURES, columns=["uid"]).column("uid").to_numpy()
        keep = np.arange(len(uids)) % 4 != 0  # every fourth sample is a duplicate
        return StageResult(
            output=pa.table(
                {
                    "uid": pa.array(uids, pa.uint64()),
                    "keep": pa.array(keep),
                    "reason": pa.array([None if k else "duplicate" for k in keep], pa.string()),
                    "duplicate_of": pa.nulls(len(uids), pa.uint64()),
                    "distance": pa.nulls(len(uids), pa.float32()),
                }
            ),
            removed=pa.table(
                {
                    "uid": pa.array(uids[~keep], pa.uint64()),
                    "reason": pa.array(["duplicate"] * int((~keep).sum())),
                }
            ),
        )


def test_stage_on_dataset_root(tmp_path: Path):
    root = DatasetRoot(tmp_path / "root")
    part = Partition("laion", "part-00000")
    assert run_partition(root, FakeFeatures(), part).status == "done"
    assert run_partition(root, FakeDedup(), part).status == "done"
    det_path = tmp_path / "rs.npz"
    toy_detector().save(det_path)
    cfg = OutliersConfig(rule="either", clip_threshold=0.2, detector_path=str(det_path))
    stage = OutliersStage(cfg, backbone=BACKBONE)

    out = run_partition(root, stage, part)
    assert out.status == "done", out.error
    decisions = root.read_table(root.output_path(OUTLIERS, part.source, part.name))
    ledger = root.read_table(root.ledger_path(OUTLIERS, part.source, part.name))
    dedup = root.read_table(root.output_path(DEDUP, part.source, part.name))
    n_dedup_kept = int(np.sum(dedup.column("keep").to_numpy(zero_copy_only=False)))
    kept = int(np.sum(decisions.column("keep").to_numpy(zero_copy_only=False)))

    # Statistics add up: dedup kept = outliers kept + outliers in the ledger.
    assert decisions.num_rows == n_dedup_kept == 30
    assert kept + ledger.num_rows == n_dedup_kept
    assert 0 < ledger.num_rows < n_dedup_kept
    assert set(decisions.column("uid").to_pylist()) == set(
        dedup.filter(dedup.column("keep")).column("uid").to_pylist()
    )
    assert set(ledger.column("stage").to_pylist()) == {OUTLIERS}
    assert set(ledger.column("source").to_pylist()) == {"laion"}
    removed = decisions.filter(pc.invert(decisions.column("keep")))
    assert sorted(removed.column("uid").to_pylist()) == sorted(ledger.column("uid").to_pylist())
    for row in ledger.to_pylist():
        d = json.loads(row["detail"])
        assert d["clip_score"] is not None and d["rs_prob"] is not None
        assert set(row["reason"].split("+")) <= {LOW_CLIP, NOT_RS}
        assert (LOW_CLIP in row["reason"]) == (d["clip_score"] < 0.2)
        assert (NOT_RS in row["reason"]) == (d["rs_prob"] < 0.5)
    # Scores survive float16 storage.
    uids, _, _, clip = _rows()
    by_uid = dict(zip(uids.tolist(), clip.tolist(), strict=True))
    for uid, score in zip(
        decisions.column("uid").to_pylist(), decisions.column("clip_score").to_pylist(), strict=True
    ):
        assert score == pytest.approx(by_uid[uid], abs=2e-3)
    marker = root.read_json(root.marker_path(OUTLIERS, part.source, part.name))
    assert marker["counts"]["kept"] == kept and marker["counts"]["removed"] == ledger.num_rows
    assert marker["params"]["detector_sha256"] and marker["params"]["rule"] == "either"

    # Current: skipped. A new detector file reruns exactly this stage.
    assert run_partition(root, OutliersStage(cfg, backbone=BACKBONE), part).status == "skipped"
    toy_detector(threshold=0.9).save(det_path)
    again = run_partition(root, OutliersStage(cfg, backbone=BACKBONE), part)
    assert again.status == "done" and again.removed >= ledger.num_rows
    assert run_partition(root, FakeDedup(), part).status == "skipped"
    # Another threshold reruns too.
    cfg2 = cfg.model_copy(update={"clip_threshold": 0.1})
    assert run_partition(root, OutliersStage(cfg2, backbone=BACKBONE), part).status == "done"


def test_stage_refuses_a_detector_of_another_backbone(tmp_path: Path):
    det_path = tmp_path / "rs.npz"
    toy_detector(backbone="ViT-B-32@laion2b_s34b_b79k").save(det_path)
    cfg = OutliersConfig(detector_path=str(det_path))
    with pytest.raises(BackboneMismatch, match="ViT-B-32@laion2b_s34b_b79k"):
        OutliersStage(cfg, backbone=BACKBONE)
    # Built without a backbone, the stage checks the one the features stage recorded.
    root = DatasetRoot(tmp_path / "root")
    part = Partition("laion", "p0")

    class RecordedFeatures(FakeFeatures):
        def params(self):
            return {"backbone": BACKBONE}

    run_partition(root, RecordedFeatures(), part)
    run_partition(root, FakeDedup(), part)
    out = run_partition(root, OutliersStage(cfg), part)
    assert out.status == "failed" and "BackboneMismatch" in out.error
    assert BACKBONE in out.error and not root.exists(root.output_path(OUTLIERS, "laion", "p0"))
    # The clip rule alone needs no detector and no backbone.
    assert OutliersStage(OutliersConfig()).params()["detector_sha256"] is None
