"""The remote-sensing image detector: a classifier head over a CLIP backbone's image embeddings.

It answers "is this web image remote-sensing imagery?" (not a satellite dish, a drone selfie or
a top view of food) from the image embedding the features stage already stored, so scoring
costs no image decoding. It is trained from labelled folders (remote-sensing versus other
images) by :func:`train_detector_from_folders` (``rs5m train-detector``), and saved as one
small ``.npz`` file (arrays plus a JSON header; no pickle, so loading a file runs no code).

The file records the identity of the backbone whose embeddings it was trained on; loading it
for another backbone raises :class:`BackboneMismatch`, because the head is meaningless on
another embedding space. It also records its decision threshold and its held-out metrics.

How the threshold is chosen: out-of-fold probabilities on the training split (k-fold), then the
cut that maximises the chosen criterion (``youden`` by default: TPR - FPR, which does not depend
on the ratio of positive to negative training images, an arbitrary property of the folders).
The held-out split is never used to choose anything, so the metrics it reports are honest.
Splits are by file (one embedding per file), stratified by folder and label, seeded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np

FORMAT = "rs5m-rs-detector/1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
Kind = Literal["logreg", "mlp"]
ThresholdMethod = Literal["youden", "f1", "precision", "recall"]


class BackboneMismatch(ValueError):
    """The detector was trained on another backbone's embeddings than the one in use."""

    def __init__(self, path: str, trained_on: str, expected: str):
        self.path, self.trained_on, self.expected = path, trained_on, expected
        super().__init__(
            f"remote-sensing detector {path} was trained on embeddings of backbone "
            f"{trained_on!r}, but the configured backbone is {expected!r}: its scores would be "
            "meaningless. Retrain it for this backbone with `rs5m train-detector` (same "
            "model_name and weights as the features stage), or configure the matching backbone."
        )


# -- the model -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Detector:
    """Standardisation, then dense layers (ReLU between, logistic at the end).

    ``kind="logreg"`` is one layer (logistic regression); ``kind="mlp"`` has hidden layers.
    ``threshold`` is on the probability of "remote sensing": at or above it, an image counts as
    remote-sensing imagery. ``metrics`` holds the held-out ROC AUC, precision and recall at the
    threshold (remote sensing as the positive class), and more.
    """

    kind: Kind
    backbone: str
    mean: np.ndarray
    scale: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    threshold: float
    metrics: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def decision_function(self, emb: np.ndarray) -> np.ndarray:
        x = np.asarray(emb, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"detector expects embeddings of shape (n, {self.dim}) from {self.backbone!r}, "
                f"got {x.shape}"
            )
        # Standardisation folded into the first layer: one pass over the embeddings.
        w0 = self.weights[0] / self.scale[:, None]
        b0 = self.biases[0] - (self.mean / self.scale) @ self.weights[0]
        h = x @ w0 + b0
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            np.maximum(h, 0.0, out=h)
            h = h @ w + b
        return h[:, 0]

    def predict_proba(self, emb: np.ndarray) -> np.ndarray:
        """Probability that each image is remote-sensing imagery, float32, shape ``(n,)``."""
        z = np.clip(self.decision_function(emb).astype(np.float64), -60.0, 60.0)
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def predict(self, emb: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """True where the image counts as remote sensing."""
        return self.predict_proba(emb) >= (self.threshold if threshold is None else threshold)

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "backbone": self.backbone,
            "dim": self.dim,
            "threshold": self.threshold,
            "metrics": self.metrics,
            "params": self.params,
            "created_at": self.created_at,
            "layers": len(self.weights),
        }

    # -- persistence ---------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "header": np.array(json.dumps(self.metadata, sort_keys=True, default=_jsonable)),
            "mean": self.mean.astype(np.float32),
            "scale": self.scale.astype(np.float32),
        }
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            arrays[f"w{i}"] = w.astype(np.float32)
            arrays[f"b{i}"] = b.astype(np.float32)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the detector to ``path`` (local or fsspec URL) atomically; returns its sha256."""
        data = self.to_bytes()
        path = str(path)
        fs, fpath = fsspec.core.url_to_fs(path)
        parent = os.path.dirname(fpath)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = f"{fpath}.tmp-{uuid.uuid4().hex[:12]}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, fpath)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def from_bytes(
        cls, data: bytes, expected_backbone: str | None, path: str = "<bytes>"
    ) -> Detector:
        try:
            npz = np.load(io.BytesIO(data), allow_pickle=False)
            header = json.loads(str(npz["header"]))
        except Exception as exc:
            raise ValueError(f"{path} is not a remote-sensing detector file: {exc}") from exc
        if header.get("format") != FORMAT:
            raise ValueError(
                f"{path}: unsupported detector format {header.get('format')!r} "
                f"(this version reads {FORMAT!r})"
            )
        if expected_backbone is not None and header["backbone"] != expected_backbone:
            raise BackboneMismatch(path, header["backbone"], expected_backbone)
        n = int(header["layers"])
        return cls(
            kind=header["kind"],
            backbone=header["backbone"],
            mean=npz["mean"],
            scale=npz["scale"],
            weights=tuple(npz[f"w{i}"] for i in range(n)),
            biases=tuple(npz[f"b{i}"] for i in range(n)),
            threshold=float(header["threshold"]),
            metrics=header.get("metrics", {}),
            params=header.get("params", {}),
            created_at=header.get("created_at", ""),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_backbone: str | None) -> Detector:
        """Read a detector; raises :class:`BackboneMismatch` when it was trained on another
        backbone than ``expected_backbone`` (pass ``None`` only to inspect a file)."""
        with fsspec.open(str(path), "rb") as f:
            data = f.read()
        return cls.from_bytes(data, expected_backbone, str(path))


def detector_sha256(path: str | os.PathLike[str]) -> str:
    """The detector file's identity (enters the outliers stage's fingerprint)."""
    h = hashlib.sha256()
    with fsspec.open(str(path), "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# -- splitting, thresholds, metrics ------------------------------------------------------------
def split_by_file(
    labels: np.ndarray,
    groups: Sequence[str] | np.ndarray | None = None,
    strata: Sequence[str] | np.ndarray | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of a train and a test split.

    ``groups`` names the file each row comes from (rows of one file, e.g. crops, always land
    in the same split; default: one row per file). The split is stratified by
    ``(stratum, label)`` of each file (default stratum: the label), seeded, and puts at least
    one file of every stratum with two or more files into each side.
    """
    labels = np.asarray(labels)
    n = len(labels)
    groups = np.arange(n).astype(str) if groups is None else np.asarray(groups).astype(str)
    strata = np.full(n, "", dtype=object) if strata is None else np.asarray(strata, dtype=object)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError("test_fraction must be in [0, 1)")
    uniq, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    for g_idx in range(len(uniq)):  # a file must not straddle labels or strata
        rows = inverse == g_idx
        if len(set(labels[rows].tolist())) > 1 or len(set(strata[rows].tolist())) > 1:
            raise ValueError(f"file {uniq[g_idx]!r} has rows with different labels or strata")
    file_key = np.array([f"{strata[i]}\x1f{labels[i]}" for i in first], dtype=object)
    rng = np.random.default_rng(seed)
    test_files = np.zeros(len(uniq), dtype=bool)
    if test_fraction > 0:
        for key in sorted(set(file_key.tolist())):
            members = np.flatnonzero(file_key == key)
            k = round(test_fraction * len(members))
            k = min(max(k, 1), len(members) - 1) if len(members) >= 2 else 0
            test_files[rng.permutation(members)[:k]] = True
    test_rows = test_files[inverse]
    return np.flatnonzero(~test_rows), np.flatnonzero(test_rows)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN when a class is missing."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    if y.min(initial=1) == y.max(initial=0) or len(y) == 0:
        return float("nan")
    return float(roc_auc_score(y, score))


def binary_metrics(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, Any]:
    """ROC AUC and the confusion numbers at ``threshold`` (positive: remote sensing)."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(prob) >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {
        "roc_auc": roc_auc(y, prob),
        "precision": precision,
        "recall": recall,
        "specificity": specificity,  # share of non-remote-sensing images the detector rejects
        "f1": f1,
        "accuracy": (tp + tn) / len(y) if len(y) else float("nan"),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "n": len(y),
        "n_pos": int(y.sum()),
        "n_neg": int((~y).sum()),
    }


def choose_threshold(
    y: np.ndarray, prob: np.ndarray, method: ThresholdMethod = "youden", target: float = 0.95
) -> float:
    """The probability cut that maximises ``method`` on (out-of-fold) training predictions.

    ``youden``: TPR - FPR. ``f1``: F1 of the remote-sensing class. ``precision``: the lowest cut
    whose precision reaches ``target`` (most recall at that precision). ``recall``: the highest
    cut whose recall reaches ``target`` (most rejected negatives at that recall).
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    if y.min(initial=1) == y.max(initial=0):
        return 0.5
    if method == "youden":
        fpr, tpr, thr = roc_curve(y, prob)
        thr = np.minimum(thr, 1.0)
        i = int(np.argmax(tpr - fpr))
        return float(thr[i])
    prec, rec, thr = precision_recall_curve(y, prob)
    prec, rec = prec[:-1], rec[:-1]  # align with thr (ascending thresholds)
    if method == "f1":
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0)
        return float(thr[int(np.argmax(f1))])
    if method == "precision":
        ok = np.flatnonzero(prec >= target)
        return float(thr[ok[0]] if len(ok) else thr[-1])
    if method == "recall":
        ok = np.flatnonzero(rec >= target)
        return float(thr[ok[-1]] if len(ok) else thr[0])
    raise ValueError(f"unknown threshold method {method!r}")


# -- training ------------------------------------------------------------------------------------
def _fit_head(
    x: np.ndarray,
    y: np.ndarray,
    kind: Kind,
    c: float,
    hidden: tuple[int, ...],
    seed: int,
    max_iter: int,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Fit on standardised ``x``; return layer weights and biases (last layer: one unit)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    pos = max(int(y.sum()), 1)
    neg = max(int(len(y) - y.sum()), 1)
    # Balanced class weights: the ratio of positive to negative folders is arbitrary.
    sample_weight = np.where(y == 1, len(y) / (2.0 * pos), len(y) / (2.0 * neg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if kind == "logreg":
            from sklearn.linear_model import LogisticRegression

            m = LogisticRegression(C=c, max_iter=max_iter, tol=1e-4)
            m.fit(x, y, sample_weight=sample_weight)
            return (m.coef_.T.astype(np.float32),), (m.intercept_.astype(np.float32),)
        if kind == "mlp":
            from sklearn.neural_network import MLPClassifier

            m = MLPClassifier(
                hidden_layer_sizes=hidden,
                alpha=1.0 / c,
                max_iter=max_iter,
                random_state=seed,
                early_stopping=False,
            )
            m.fit(x, y, sample_weight=sample_weight)
            ws = tuple(w.astype(np.float32) for w in m.coefs_)
            bs = tuple(b.astype(np.float32) for b in m.intercepts_)
            return ws, bs
    raise ValueError(f"unknown detector kind {kind!r}")


def train_detector(
    embeddings_pos: np.ndarray,
    embeddings_neg: np.ndarray,
    backbone_identity: str,
    *,
    kind: Kind = "logreg",
    c: float | Sequence[float] = (0.01, 0.1, 1.0),
    hidden: tuple[int, ...] = (64,),
    test_fraction: float = 0.25,
    seed: int = 0,
    threshold_method: ThresholdMethod = "youden",
    threshold_target: float = 0.95,
    cv_folds: int = 5,
    max_iter: int = 1000,
    groups_pos: Sequence[str] | None = None,
    groups_neg: Sequence[str] | None = None,
    strata_pos: Sequence[str] | None = None,
    strata_neg: Sequence[str] | None = None,
    augment_pos: np.ndarray | None = None,
    augment_neg: np.ndarray | None = None,
) -> Detector:
    """Train a detector on remote-sensing (``pos``) versus other (``neg``) image embeddings.

    Rows are split by file (``groups_*``: the file of each row; default one row per file),
    stratified by ``strata_*`` (e.g. the folder) and label. On the train split, out-of-fold
    probabilities (``cv_folds``, files kept whole) choose the L2 regularisation ``c`` (the
    inverse strength: sklearn's ``C`` for logreg, ``alpha = 1/c`` for the MLP; a list is a grid
    searched by out-of-fold ROC AUC) and then the threshold (``threshold_method``); the head is
    then fitted on the whole train split. The held-out split gives the reported metrics,
    overall and per stratum; it chooses nothing. ``test_fraction=0`` trains on everything and
    reports no held-out metrics.

    ``augment_pos`` / ``augment_neg``: ``(n, k, d)`` embeddings of ``k`` augmented views (random
    crops) of each row's file; they join the training rows of their file only (never a
    held-out or out-of-fold validation row), so every score is on whole images.
    """
    pos = np.asarray(embeddings_pos, dtype=np.float32)
    neg = np.asarray(embeddings_neg, dtype=np.float32)
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise ValueError(f"embeddings must be (n, d) of one d, got {pos.shape} and {neg.shape}")
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"need at least 2 images per class, got {len(pos)} and {len(neg)}")
    x = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    groups = _default(groups_pos, len(pos), "pos") + _default(groups_neg, len(neg), "neg")
    strata = _default(strata_pos, len(pos), "rs", same=True) + _default(
        strata_neg, len(neg), "other", same=True
    )
    groups_a, strata_a = np.asarray(groups), np.asarray(strata, dtype=object)
    train, test = split_by_file(y, groups_a, strata_a, test_fraction, seed)
    aug = _augmentations(augment_pos, augment_neg, pos, neg)

    started = time.monotonic()
    mean = x[train].mean(axis=0)
    scale = x[train].std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0).astype(np.float32)
    z = (x - mean) / scale
    folds = _group_folds(y[train], groups_a[train], strata_a[train], cv_folds, seed)
    c_grid = [float(c)] if isinstance(c, int | float) else [float(v) for v in c]
    if not c_grid:
        raise ValueError("c: give a value or a non-empty list of values")
    # Out-of-fold probabilities on the train split (split by file too) choose the
    # regularisation (best out-of-fold ROC AUC when c is a list) and then the threshold.
    best: tuple[float, float, np.ndarray] | None = None
    for c_value in c_grid:
        oof = np.full(len(train), np.nan)
        for k in range(int(folds.max(initial=-1)) + 1):
            va = folds == k
            if va.all() or not va.any() or len(set(y[train][~va].tolist())) < 2:
                continue
            zz, yy = _training_rows(z, y, aug, mean, scale, train[~va])
            ws, bs = _fit_head(zz, yy, kind, c_value, tuple(hidden), seed, max_iter)
            oof[va] = _head(ws, bs, z[train][va])
        have = ~np.isnan(oof)
        auc = roc_auc(y[train][have], oof[have]) if have.any() else float("nan")
        if best is None or (not np.isnan(auc) and (np.isnan(best[1]) or auc > best[1])):
            best = (c_value, auc, oof)
    assert best is not None
    c_chosen, cv_auc, oof = best
    have = ~np.isnan(oof)
    threshold = (
        choose_threshold(y[train][have], oof[have], threshold_method, threshold_target)
        if have.sum() and len(set(y[train][have].tolist())) == 2
        else 0.5
    )
    zz, yy = _training_rows(z, y, aug, mean, scale, train)
    ws, bs = _fit_head(zz, yy, kind, c_chosen, tuple(hidden), seed, max_iter)
    train_seconds = time.monotonic() - started
    det = Detector(
        kind=kind,
        backbone=backbone_identity,
        mean=mean.astype(np.float32),
        scale=scale,
        weights=ws,
        biases=bs,
        threshold=float(threshold),
        params={
            "kind": kind,
            "c": c_chosen,
            "c_grid": c_grid,
            "hidden": list(hidden) if kind == "mlp" else [],
            "seed": seed,
            "test_fraction": test_fraction,
            "cv_folds": cv_folds,
            "threshold_method": threshold_method,
            "threshold_target": threshold_target,
            "augmented_views": 0 if aug is None else int(aug.shape[1]),
        },
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )

    metrics: dict[str, Any] = {
        "n_train": len(train),
        "n_test": len(test),
        "n_train_pos": int(y[train].sum()),
        "n_train_neg": int(len(train) - y[train].sum()),
        "n_train_rows": len(yy),
        "threshold": float(threshold),
        "threshold_method": threshold_method,
        "train_seconds": round(train_seconds, 3),
    }
    if have.sum():
        metrics["cv_roc_auc"] = cv_auc
    if len(test):
        prob = det.predict_proba(x[test])
        held = binary_metrics(y[test], prob, threshold)
        metrics.update({k: held[k] for k in ("roc_auc", "precision", "recall", "specificity")})
        metrics.update({"f1": held["f1"], "accuracy": held["accuracy"]})
        metrics["n_test_pos"], metrics["n_test_neg"] = held["n_pos"], held["n_neg"]
        by: dict[str, Any] = {}
        neg_test = y[test] == 0
        for s in sorted(set(strata_a[test].tolist())):
            rows = strata_a[test] == s
            is_pos = bool(y[test][rows][0])
            if is_pos:  # this positive stratum against all held-out negatives
                sub = rows | neg_test
                m = binary_metrics(y[test][sub], prob[sub], threshold)
                by[s] = {"label": "rs", "n": int(rows.sum()), "roc_auc": m["roc_auc"]}
                by[s]["recall"] = float(np.mean(prob[rows] >= threshold))
            else:
                by[s] = {"label": "other", "n": int(rows.sum())}
                by[s]["specificity"] = float(np.mean(prob[rows] < threshold))
        metrics["by_stratum"] = by
    return dataclasses.replace(det, metrics=_clean(metrics))


def _augmentations(
    augment_pos: np.ndarray | None, augment_neg: np.ndarray | None, pos: np.ndarray, neg: np.ndarray
) -> np.ndarray | None:
    if augment_pos is None and augment_neg is None:
        return None
    if augment_pos is None or augment_neg is None:
        raise ValueError("give augment_pos and augment_neg together")
    ap = np.asarray(augment_pos, np.float32)
    an = np.asarray(augment_neg, np.float32)
    d = pos.shape[1]
    if ap.ndim != 3 or an.ndim != 3 or ap.shape[1] != an.shape[1]:
        raise ValueError(f"augmentations must be (n, k, d) of one k, got {ap.shape}, {an.shape}")
    if ap.shape[0] != len(pos) or an.shape[0] != len(neg) or {ap.shape[2], an.shape[2]} != {d}:
        raise ValueError(
            f"augmentations {ap.shape}, {an.shape} do not match {pos.shape}, {neg.shape}"
        )
    return np.concatenate([ap, an]) if ap.shape[1] else None


def _training_rows(
    z: np.ndarray,
    y: np.ndarray,
    aug: np.ndarray | None,
    mean: np.ndarray,
    scale: np.ndarray,
    idx: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Standardised training rows of the files ``idx``: their embeddings, then their views."""
    if aug is None:
        return z[idx], y[idx]
    k = aug.shape[1]
    za = ((aug[idx] - mean) / scale).reshape(len(idx) * k, -1)
    return np.concatenate([z[idx], za]), np.concatenate([y[idx], np.repeat(y[idx], k)])


def _default(values: Sequence[str] | None, n: int, prefix: str, same: bool = False) -> list[str]:
    if values is None:
        return [prefix] * n if same else [f"{prefix}:{i}" for i in range(n)]
    if len(values) != n:
        raise ValueError(f"expected {n} group/stratum names, got {len(values)}")
    return [f"{prefix}:{v}" if not same else str(v) for v in values]


def _head(ws: tuple[np.ndarray, ...], bs: tuple[np.ndarray, ...], z: np.ndarray) -> np.ndarray:
    h = z.astype(np.float32)
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        h = h @ w + b
        if i < len(ws) - 1:
            np.maximum(h, 0.0, out=h)
    return 1.0 / (1.0 + np.exp(-np.clip(h[:, 0].astype(np.float64), -60, 60)))


def _group_folds(
    y: np.ndarray, groups: np.ndarray, strata: np.ndarray, k: int, seed: int
) -> np.ndarray:
    """A fold number per row; files stay whole, strata and labels spread over the folds."""
    folds = np.full(len(y), -1, dtype=np.int64)
    if k < 2:
        return folds
    uniq, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    key = np.array([f"{strata[i]}\x1f{y[i]}" for i in first], dtype=object)
    rng = np.random.default_rng(seed + 1)
    file_fold = np.zeros(len(uniq), dtype=np.int64)
    offset = 0
    for s in sorted(set(key.tolist())):
        members = rng.permutation(np.flatnonzero(key == s))
        file_fold[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)
    return file_fold[inverse]


def _clean(obj: Any) -> Any:
    """JSON-safe metrics: NaN becomes None."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return None if np.isnan(v) else round(v, 6)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# -- from folders of images ----------------------------------------------------------------------
def list_images(directory: str | os.PathLike[str]) -> list[str]:
    """Image files under ``directory`` (recursively), sorted."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {directory}")
    return sorted(
        str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def random_crops(image: Any, k: int, rng: np.random.Generator) -> list[Any]:
    """``k`` random crops of a PIL image: 30-100 % of its area, same aspect, random place,
    half of them mirrored (the augmentation of :func:`train_detector`'s ``augment_*``)."""
    from PIL import Image

    w, h = image.size
    out = []
    for _ in range(k):
        s = float(np.sqrt(rng.uniform(0.3, 1.0)))
        cw, ch = max(1, int(w * s)), max(1, int(h * s))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(crop)
    return out


def embed_files(
    embedder: Any,
    paths: Sequence[str],
    chunk: int = 256,
    crops_per_image: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
    """Embed image files in chunks (never all decoded at once).

    ``embedder`` has ``embed_images(list[PIL.Image]) -> np.ndarray`` (``tasks.embed.ClipEmbedder``).
    Returns the embeddings ``(n, d)``, the paths embedded, the paths that failed to decode, and
    the embeddings of ``crops_per_image`` random crops of each file ``(n, k, d)`` (seeded by
    ``seed`` and the file's path, so they do not depend on the order of the files).
    """
    from PIL import Image

    k = int(crops_per_image)
    parts: list[np.ndarray] = []
    crop_parts: list[np.ndarray] = []
    ok: list[str] = []
    bad: list[str] = []
    for start in range(0, len(paths), chunk):
        images, crops = [], []
        for p in paths[start : start + chunk]:
            try:
                with Image.open(p) as im:
                    rgb = im.convert("RGB")
            except Exception:
                bad.append(p)
                continue
            images.append(rgb)
            ok.append(p)
            if k:
                rng = np.random.default_rng([seed, zlib.crc32(str(p).encode())])
                crops += random_crops(rgb, k, rng)
        if images:
            x = np.asarray(embedder.embed_images(images), dtype=np.float32)
            parts.append(x)
            if k:
                xc = np.asarray(embedder.embed_images(crops), dtype=np.float32)
                crop_parts.append(xc.reshape(len(images), k, -1))
    dim = int(parts[0].shape[1]) if parts else int(getattr(embedder, "dim", 0))
    x = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    xc = np.concatenate(crop_parts) if crop_parts else np.zeros((len(x), k, dim), np.float32)
    return x, ok, bad, xc


@dataclass
class FolderEmbeddings:
    """Embeddings of labelled folders, with the file and folder of each row."""

    x: np.ndarray
    paths: list[str]
    strata: list[str]
    failed: list[str]
    crops: np.ndarray  # (n, crops_per_image, d)


def embed_folders(
    embedder: Any, dirs: Sequence[str], crops_per_image: int = 0, seed: int = 0
) -> FolderEmbeddings:
    """Embed every image under each folder; the stratum of an image is its folder's name."""
    xs, cs, paths, strata, failed = [], [], [], [], []
    for d in dirs:
        x, ok, bad, xc = embed_files(
            embedder, list_images(d), crops_per_image=crops_per_image, seed=seed
        )
        name = Path(d).name or str(d)
        xs.append(x)
        cs.append(xc)
        paths += ok
        strata += [name] * len(ok)
        failed += bad
    dim = int(getattr(embedder, "dim", 0))
    x = np.concatenate(xs) if xs else np.zeros((0, dim), np.float32)
    xc = np.concatenate(cs) if cs else np.zeros((0, crops_per_image, dim), np.float32)
    return FolderEmbeddings(x, paths, strata, failed, xc)


def train_detector_from_folders(
    embedder: Any,
    positive_dirs: Sequence[str],
    negative_dirs: Sequence[str],
    out_path: str | None = None,
    crops_per_image: int = 0,
    **train_kwargs: Any,
) -> tuple[Detector, str | None]:
    """Embed the folders with ``embedder``, train (:func:`train_detector`), save when
    ``out_path`` is given. Returns the detector and the saved file's sha256.

    ``crops_per_image`` > 0 also embeds that many random crops of every file and trains on
    them too (files of the held-out split contribute nothing: it is split by file, and its
    metrics are on the whole images only, as the pipeline scores them)."""
    seed = int(train_kwargs.get("seed", 0))
    pos = embed_folders(embedder, positive_dirs, crops_per_image, seed)
    neg = embed_folders(embedder, negative_dirs, crops_per_image, seed)
    aug = crops_per_image > 0
    det = train_detector(
        pos.x,
        neg.x,
        embedder.identity,
        groups_pos=pos.paths,
        groups_neg=neg.paths,
        strata_pos=pos.strata,
        strata_neg=neg.strata,
        augment_pos=pos.crops if aug else None,
        augment_neg=neg.crops if aug else None,
        **train_kwargs,
    )
    failed = pos.failed + neg.failed
    if failed:
        det.metrics["n_failed_images"] = len(failed)
    sha = det.save(out_path) if out_path else None
    return det, sha
