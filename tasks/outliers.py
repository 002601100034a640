"""Outlier removal: drop web images whose caption does not describe them, or that are not
remote-sensing imagery, keeping both scores in the ledger.

Per partition, over the samples deduplication kept (``dedup.keep``), from the embeddings the
features stage stored (nothing is re-embedded):

* ``clip_score``: cosine similarity of the image and caption embeddings;
* ``rs_prob``: the remote-sensing detector's probability (``tasks.rs_detector``), when a detector
  is configured.

``schemas.outliers_config.OutliersConfig.rule`` combines them. The output holds one DECISIONS
row per scored sample (``keep``, ``reason``, ``clip_score``, ``rs_prob``); the removed ones also
go to the ledger with reason ``low_clip_score``, ``not_remote_sensing`` or
``low_clip_score+not_remote_sensing`` (only the criteria the rule uses are named) and a JSON
detail with both scores and both thresholds. Samples without a stored embedding (none are
expected) are removed with reason ``missing_embedding``.

Percentile thresholds are computed per partition (one shard of one source): a partition's
decisions then depend on that partition only, so partitions stay independent, parallel and
stable when new partitions arrive. The cost: the cut varies a little between partitions of one
source, and a percentile always removes about that share of a partition even when all of it is
good (use the absolute mode, or the detector, where that matters). Partitions with fewer than
``percentile_min_samples`` scored samples use the absolute threshold instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.embeddings import lists_to_masked_matrix as embeddings_to_numpy
from schemas.outliers_config import OutliersConfig, Rule
from schemas.tables import DECISIONS, DEDUP, FEATURES, OUTLIERS
from storage.stage import Stage, StageContext, StageResult, dumps_detail
from tasks.rs_detector import BackboneMismatch, Detector, detector_sha256

LOW_CLIP = "low_clip_score"
NOT_RS = "not_remote_sensing"
MISSING = "missing_embedding"


# -- plain functions over arrays -----------------------------------------------------------------
def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (rows re-normalised: float16 storage shifts norms a little)."""
    a = np.asarray(image_emb, np.float32)
    b = np.asarray(text_emb, np.float32)
    if a.shape != b.shape:
        raise ValueError(f"image and text embeddings differ in shape: {a.shape} vs {b.shape}")
    na = np.sqrt(np.einsum("ij,ij->i", a, a))
    nb = np.sqrt(np.einsum("ij,ij->i", b, b))
    dots = np.einsum("ij,ij->i", a, b)
    return (dots / np.maximum(na * nb, 1e-12)).astype(np.float32)


def clip_cut(scores: np.ndarray, cfg: OutliersConfig) -> float:
    """The clip-score threshold for these (one partition's) scores."""
    scores = np.asarray(scores)
    if cfg.clip_threshold_mode == "percentile" and len(scores) >= cfg.percentile_min_samples:
        return float(np.percentile(scores.astype(np.float64), cfg.clip_percentile))
    return float(cfg.clip_threshold)


def outlier_mask(low_clip: np.ndarray, not_rs: np.ndarray, rule: Rule) -> np.ndarray:
    """Which samples the rule removes, given which are low on each criterion."""
    low_clip = np.asarray(low_clip, bool)
    not_rs = np.asarray(not_rs, bool)
    if rule == "clip":
        return low_clip.copy()
    if rule == "detector":
        return not_rs.copy()
    if rule == "either":
        return low_clip | not_rs
    if rule == "both":
        return low_clip & not_rs
    raise ValueError(f"unknown outlier rule {rule!r}")


@dataclass
class Scored:
    """The decisions for one partition's scored samples."""

    decisions: pa.Table  # DECISIONS schema, one row per scored sample
    removed: pa.Table  # uid, reason, detail
    counts: dict[str, int]
    clip_threshold: float
    detector_threshold: float | None


def score_samples(
    uids: np.ndarray,
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    cfg: OutliersConfig,
    detector: Detector | None = None,
    valid: np.ndarray | None = None,
) -> Scored:
    """Score and decide; ``valid`` marks rows that have both embeddings (default: all)."""
    n = len(uids)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    rule = cfg.effective_rule
    if rule != "clip" and detector is None:
        raise ValueError(f"rule {rule!r} needs a detector")

    all_valid = n > 0 and bool(valid.all())
    clip = np.full(n, np.nan, np.float32)
    if all_valid:
        clip = clip_scores(image_emb, text_emb)
    elif valid.any():
        clip[valid] = clip_scores(image_emb[valid], text_emb[valid])
    clip_thr = clip_cut(clip[valid], cfg)
    low_clip = valid & (clip < clip_thr)

    prob = np.full(n, np.nan, np.float32)
    det_thr: float | None = None
    not_rs = np.zeros(n, bool)
    if detector is not None:
        det_thr = (
            float(cfg.detector_threshold)
            if cfg.detector_threshold is not None
            else float(detector.threshold)
        )
        if all_valid:
            prob = detector.predict_proba(image_emb)
        elif valid.any():
            prob[valid] = detector.predict_proba(image_emb[valid])
        not_rs = valid & (prob < det_thr)

    out = outlier_mask(low_clip, not_rs, rule) | ~valid
    uses_clip = rule in ("clip", "either", "both")
    uses_det = rule in ("detector", "either", "both")
    named_clip = out & low_clip if uses_clip else np.zeros(n, bool)
    named_det = out & not_rs if uses_det else np.zeros(n, bool)
    reasons = np.full(n, None, dtype=object)
    reasons[named_clip] = LOW_CLIP
    reasons[named_det] = NOT_RS
    reasons[named_clip & named_det] = f"{LOW_CLIP}+{NOT_RS}"
    reasons[~valid] = MISSING

    def _f(values: np.ndarray) -> pa.Array:
        return pa.array(values, pa.float32(), mask=np.isnan(values))

    decisions = pa.table(
        {
            "uid": pa.array(np.asarray(uids, np.uint64), pa.uint64()),
            "keep": pa.array(~out, pa.bool_()),
            "reason": pa.array(reasons.tolist(), pa.string()),
            "duplicate_of": pa.nulls(n, pa.uint64()),
            "distance": pa.nulls(n, pa.float32()),
            "clip_score": _f(clip),
            "rs_prob": _f(prob),
        },
        schema=DECISIONS,
    )
    idx = np.flatnonzero(out)
    details = [
        dumps_detail(
            clip_score=_num(clip[i]),
            rs_prob=_num(prob[i]),
            clip_threshold=round(clip_thr, 6),
            clip_threshold_mode=cfg.clip_threshold_mode,
            detector_threshold=det_thr,
            rule=rule,
        )
        for i in idx
    ]
    removed = pa.table(
        {
            "uid": pa.array(np.asarray(uids, np.uint64)[idx], pa.uint64()),
            "reason": pa.array(reasons[idx].tolist(), pa.string()),
            "detail": pa.array(details, pa.string()),
        }
    )
    counts = {
        "scored": n,
        "kept": int((~out).sum()),
        "outliers": int(out.sum()),
        "low_clip_score": int(low_clip.sum()),  # flagged, whether or not the rule removes
        "not_remote_sensing": int(not_rs.sum()),
        "missing_embedding": int((~valid).sum()),
    }
    return Scored(decisions, removed, counts, clip_thr, det_thr)


def _num(v: float) -> float | None:
    return None if np.isnan(v) else round(float(v), 6)


def score_features(
    features: pa.Table, cfg: OutliersConfig, detector: Detector | None = None
) -> Scored:
    """:func:`score_samples` over a features table (uid, image_embedding, text_embedding)."""
    img, ok_i = embeddings_to_numpy(features.column("image_embedding"))
    txt, ok_t = embeddings_to_numpy(features.column("text_embedding"))
    valid = ok_i & ok_t
    if valid.any() and img.shape[1] != txt.shape[1]:
        raise ValueError(f"image ({img.shape[1]}) and text ({txt.shape[1]}) dims differ")
    if not valid.all():  # keep the shapes aligned for the masked rows
        d = max(img.shape[1], txt.shape[1])
        img = _pad(img, d)
        txt = _pad(txt, d)
    uids = features.column("uid").to_numpy(zero_copy_only=False)
    return score_samples(uids, img, txt, cfg, detector, valid)


def _pad(x: np.ndarray, d: int) -> np.ndarray:
    return x if x.shape[1] == d else np.zeros((len(x), d), np.float32)


# -- the stage -----------------------------------------------------------------------------------
class OutliersStage(Stage):
    """Scores the samples deduplication kept; removes the outliers the rule names.

    ``backbone`` is the identity of the embedder that produced the features
    (``tasks.embed.weights_identity(...)``, equal to ``ClipEmbedder(...).identity``); when
    given, a detector trained on another backbone is refused as the stage is built. Each
    partition is also checked against the ``backbone`` the features stage recorded in its
    marker, so a mismatch never scores anything (it fails the partition with
    ``tasks.rs_detector.BackboneMismatch``). The detector file's sha256 enters the parameters,
    so a new detector reruns exactly this stage.
    """

    name = OUTLIERS
    version = "1"
    inputs = (DEDUP, FEATURES)

    def __init__(
        self,
        settings: OutliersConfig,
        backbone: str | None = None,
        detector: Detector | None = None,
    ):
        self.settings = settings
        self.backbone = backbone
        self.detector_sha256: str | None = None
        self.detector: Detector | None = None
        if settings.detector_path:
            self.detector_sha256 = detector_sha256(settings.detector_path)
            self.detector = detector or Detector.load(settings.detector_path, backbone)
            self._check_backbone(backbone)

    def _check_backbone(self, backbone: str | None) -> None:
        if self.detector is not None and backbone and self.detector.backbone != backbone:
            path = self.settings.detector_path or "<detector>"
            raise BackboneMismatch(path, self.detector.backbone, backbone)

    def params(self) -> dict[str, Any]:
        cfg = self.settings.model_dump(exclude={"detector_path", "rule"})
        cfg["rule"] = self.settings.effective_rule
        return {
            **cfg,
            "detector_sha256": self.detector_sha256,
            "detector_backbone": self.detector.backbone if self.detector else None,
        }

    def run(self, ctx: StageContext) -> StageResult:
        part = ctx.partition
        marker = ctx.root.read_json(ctx.root.marker_path(FEATURES, part.source, part.name))
        self._check_backbone(((marker or {}).get("params") or {}).get("backbone"))
        dedup = ctx.read_input(DEDUP, columns=["uid", "keep"])
        kept = dedup.filter(pc.fill_null(dedup.column("keep"), False)).column("uid")
        features = ctx.read_input(FEATURES, columns=["uid", "image_embedding", "text_embedding"])
        wanted = pc.is_in(features.column("uid"), value_set=kept)
        if pc.all(wanted).as_py() is not True:  # copy the embeddings only when needed
            features = features.filter(wanted)
        if features.num_rows != len(kept):
            raise ValueError(
                f"{len(kept) - features.num_rows} uids kept by dedup have no features row "
                f"in {part.id}"
            )
        scored = score_features(features, self.settings, self.detector)
        counts = {**scored.counts, "dedup_rows": dedup.num_rows}
        return StageResult(output=scored.decisions, removed=scored.removed, counts=counts)
