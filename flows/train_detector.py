"""`rs5m train-detector`: train the remote-sensing image detector from labelled folders.

Thin Prefect wiring over ``tasks.rs_detector``: embed the folders with the configured backbone,
split by file (stratified by folder, seeded), train, evaluate on the held-out files, save the
detector file and publish its metrics as a table artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.rs_detector import Detector, train_detector_from_folders


@task(name="train-rs-detector")
def train_detector_task(
    positive_dirs: list[str],
    negative_dirs: list[str],
    out_path: str,
    model_name: str,
    pretrained: str | None,
    checkpoint: str | None,
    device: str,
    batch_size: int,
    train_kwargs: dict[str, Any],
) -> dict[str, Any]:
    from tasks.embed import ClipEmbedder

    embedder = ClipEmbedder(model_name, pretrained, checkpoint, device, batch_size)
    det, sha = train_detector_from_folders(
        embedder, positive_dirs, negative_dirs, out_path, **train_kwargs
    )
    return detector_summary(det, out_path, sha)


def detector_summary(det: Detector, out_path: str, sha256: str | None) -> dict[str, Any]:
    """The flow's result: where the detector is, what it was trained on, how well it does."""
    return {
        "path": out_path,
        "sha256": sha256,
        "backbone": det.backbone,
        "kind": det.kind,
        "threshold": det.threshold,
        "created_at": det.created_at,
        **det.metrics,
    }


def metrics_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric (overall), then one per folder, for the table artifact."""
    rows = [
        {"metric": k, "value": summary.get(k)}
        for k in (
            "roc_auc",
            "precision",
            "recall",
            "specificity",
            "f1",
            "threshold",
            "threshold_method",
            "cv_roc_auc",
            "n_train",
            "n_test",
            "n_test_pos",
            "n_test_neg",
            "backbone",
            "sha256",
        )
        if k in summary
    ]
    for name, m in (summary.get("by_stratum") or {}).items():
        for k, v in m.items():
            if k not in ("label",):
                rows.append({"metric": f"{name}.{k}", "value": v})
    return rows


@flow(name="train-detector", log_prints=True)
def train_detector_flow(
    positive_dirs: list[str],
    negative_dirs: list[str],
    out_path: str,
    model_name: str = "ViT-B-32",
    checkpoint: str | None = None,
    pretrained: str | None = None,
    device: str = "cpu",
    test_fraction: float = 0.25,
    seed: int = 0,
    kind: str = "logreg",
    c: list[float] | None = None,
    threshold_method: str = "youden",
    threshold_target: float = 0.95,
    batch_size: int = 64,
    crops_per_image: int = 0,
) -> dict[str, Any]:
    """Train, evaluate (held-out files) and save the detector; returns its metrics.

    Use the same ``model_name`` and weights (``checkpoint`` or ``pretrained``) as the features
    stage: the detector refuses to load against any other backbone. ``kind``: ``logreg`` or
    ``mlp``; ``c``: the regularisation grid searched by out-of-fold ROC AUC on the train split
    (default 0.01, 0.1, 1); ``threshold_method``: ``youden`` (default), ``f1``, ``precision``
    or ``recall`` (the last two reach ``threshold_target``). Images are split by file,
    stratified by folder; ``test_fraction`` of them are held out for the reported metrics.
    ``crops_per_image``: random crops of each training file embedded and trained on too
    (about +0.01 ROC AUC with the tiny offline backbone; costs that many more embeddings).
    """
    logger = get_run_logger()
    summary = train_detector_task(
        list(positive_dirs),
        list(negative_dirs),
        out_path,
        model_name,
        pretrained,
        checkpoint,
        device,
        batch_size,
        {
            "test_fraction": test_fraction,
            "seed": seed,
            "kind": kind,
            "threshold_method": threshold_method,
            "threshold_target": threshold_target,
            "crops_per_image": crops_per_image,
            **({"c": list(c)} if c else {}),
        },
    )
    create_table_artifact(
        key="rs-detector-metrics",
        table=metrics_rows(summary),
        description=f"remote-sensing detector {out_path} ({summary['backbone']})",
    )
    create_markdown_artifact(
        key="rs-detector",
        markdown=(
            f"# Remote-sensing detector\n\n`{out_path}` (sha256 `{summary['sha256']}`)\n\n"
            f"backbone `{summary['backbone']}`, {summary['kind']}, threshold "
            f"{summary['threshold']:.4f} ({threshold_method})\n\n"
            f"held-out ROC AUC {summary.get('roc_auc')}, precision {summary.get('precision')}, "
            f"recall {summary.get('recall')} on {summary.get('n_test')} files\n"
        ),
    )
    logger.info(
        "detector saved to %s: ROC AUC %s, precision %s, recall %s at %.4f",
        out_path,
        summary.get("roc_auc"),
        summary.get("precision"),
        summary.get("recall"),
        summary["threshold"],
    )
    return summary
