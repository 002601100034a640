"""Benchmark of outlier removal: scoring from stored embeddings, and detector training.

    python bench/outliers.py                     # defaults: 100k samples, dim 512, 1 thread
    python bench/outliers.py --n-score 20000 --n-train 20000 --dim 64 --kinds logreg

Measures, on synthetic embeddings (the speed does not depend on where they came from):
1. scoring (``tasks.outliers.score_features``: Arrow list<float16> columns to numpy, clip score,
   detector probability, decisions and ledger rows) on an in-memory features table;
2. the whole stage on one partition of a local dataset root (``storage.stage.run_partition``:
   parquet read of dedup + features, scoring, parquet write, digest, marker);
3. detector training (``tasks.rs_detector.train_detector``: k-fold out-of-fold threshold, final
   fit, held-out metrics) on ``--n-train`` embeddings.
Prints a markdown table (samples per second).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.outliers_config import OutliersConfig
from schemas.tables import DEDUP, FEATURES, FEATURES_TABLE
from storage.root import DatasetRoot
from storage.stage import Partition, Stage, StageContext, StageResult, run_partition
from tasks.outliers import OutliersStage, score_features
from tasks.rs_detector import train_detector

BACKBONE = "bench-backbone"


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit image and text embeddings (text correlated with image) and an RS label."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.7
    img = rng.normal(size=(n, dim)).astype(np.float32)
    img[:, :8] += np.where(y, 0.8, -0.8)[:, None]
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = 0.3 * img + rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt, y


def features_table(img: np.ndarray, txt: np.ndarray) -> pa.Table:
    n, dim = img.shape

    def col(x: np.ndarray) -> pa.Array:
        flat = pa.array(x.astype(np.float16).ravel(), pa.float16())
        return pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, np.int32)), flat)

    uids = np.arange(1, n + 1, dtype=np.uint64)
    return pa.table(
        {
            "uid": pa.array(uids, pa.uint64()),
            "phash": pa.array(uids, pa.uint64()),
            "image_embedding": col(img),
            "text_embedding": col(txt),
        },
        schema=FEATURES_TABLE,
    )


class _Given(Stage):
    """Commits a prepared table as an upstream stage's output."""

    version = "bench"

    def __init__(self, name: str, table: pa.Table, inputs: tuple[str, ...] = ()):
        self.name = name  # type: ignore[misc]
        self.inputs = inputs  # type: ignore[misc]
        self.table = table

    def run(self, ctx: StageContext) -> StageResult:
        return StageResult(output=self.table)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-score", type=int, default=100_000)
    ap.add_argument("--n-train", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--kinds", default="logreg", help="detector heads to train: logreg,mlp")
    ap.add_argument("--cv-folds", type=int, default=5)
    ap.add_argument(
        "--c", default="0.01,0.1,1", help="regularisation grid, or one value (comma-separated)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    rows: list[tuple[str, int, float]] = []

    # A detector to score with (trained on a small synthetic set; speed is what matters).
    img_s, txt_s, y_s = synthetic(args.n_score, args.dim, seed=1)
    small = min(5_000, args.n_score)
    det = train_detector(img_s[:small][y_s[:small]], img_s[:small][~y_s[:small]], BACKBONE)
    table = features_table(img_s, txt_s)
    cfg = OutliersConfig(rule="either", clip_threshold=0.2, detector_path="in-memory")
    sec = best_of(lambda: score_features(table, cfg, det), args.repeat)
    rows.append(("score (clip + logreg detector), in memory", args.n_score, sec))
    cfg_p = cfg.model_copy(update={"clip_threshold_mode": "percentile"})
    sec = best_of(lambda: score_features(table, cfg_p, det), args.repeat)
    rows.append(("score, percentile threshold, in memory", args.n_score, sec))
    sec = best_of(lambda: score_features(table, OutliersConfig(clip_threshold=0.2)), args.repeat)
    rows.append(("score (clip only), in memory", args.n_score, sec))

    with tempfile.TemporaryDirectory() as tmp:
        root = DatasetRoot(Path(tmp) / "root")
        part = Partition("bench", "part-00000")
        run_partition(root, _Given(FEATURES, table), part)
        dedup = pa.table({"uid": table.column("uid"), "keep": pa.array(np.ones(len(table), bool))})
        run_partition(root, _Given(DEDUP, dedup, (FEATURES,)), part)
        det_path = str(Path(tmp) / "det.npz")
        det.save(det_path)
        cfg_f = cfg.model_copy(update={"detector_path": det_path})
        times = []
        for _ in range(args.repeat):
            stage = OutliersStage(cfg_f, backbone=BACKBONE)
            root.remove(root.marker_path(stage.name, part.source, part.name))
            t = time.perf_counter()
            out = run_partition(root, stage, part)
            times.append(time.perf_counter() - t)
            assert out.status == "done", out.error
        rows.append(("stage on a partition (parquet in/out, marker)", args.n_score, min(times)))

    img_t, _, y_t = synthetic(args.n_train, args.dim, seed=2)
    grid = [float(v) for v in args.c.split(",")]
    for kind in args.kinds.split(","):
        t = time.perf_counter()
        d = train_detector(
            img_t[y_t], img_t[~y_t], BACKBONE, kind=kind, c=grid, cv_folds=args.cv_folds, seed=0
        )
        sec = time.perf_counter() - t
        fits = len(grid) * args.cv_folds + 1
        label = f"train {kind}, c grid {args.c} ({args.cv_folds}-fold: {fits} fits), 75% of rows"
        rows.append((label, args.n_train, sec))
        print(f"# {kind}: held-out ROC AUC {d.metrics['roc_auc']:.3f}", file=sys.stderr)

    print(
        f"\nPython {platform.python_version()}, numpy {np.__version__}, "
        f"{args.threads} thread(s), dim {args.dim}\n"
    )
    print("| step | samples | seconds | samples/s |")
    print("|---|---:|---:|---:|")
    for name, n, s in rows:
        print(f"| {name} | {n:,} | {s:.3f} | {n / s:,.0f} |")


if __name__ == "__main__":
    main()
