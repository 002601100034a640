"""The features stage: features = phash + embed, a composite stage.

Per kept sample of a partition (validate's output) it computes, in one pass over the partition's
tar shards:

- ``phash``: the 64-bit perceptual hash (``tasks/phash.py``),
- ``image_embedding`` and ``text_embedding``: open_clip embeddings of the image and of the
  caption (``tasks/embed.py``), L2-normalised, stored as float16 lists.

They are computed once here and read from this stage's output by dedup and outliers.
Images are streamed from the tars (each tar read once, sequentially) and embedded in batches, so
memory stays bounded by one batch whatever the partition size.

A sample validate kept whose image is missing from its tar or no longer decodes is a broken
partition, not a removal: the stage fails with the list of such keys and the partition is
retried after the upstream is fixed.
"""

from __future__ import annotations

import io
import threading
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from schemas.dedup_config import EmbedConfig, PhashConfig
from schemas.embeddings import float16_lists
from schemas.tables import FEATURES, FEATURES_TABLE, KEYWORD_FILTER, VALIDATE
from storage.stage import Stage, StageContext, StageResult
from tasks.embed import ClipEmbedder, weights_identity
from tasks.phash import iter_tar_images, iter_tar_members, phash_bytes, phash_image


class FeaturesStage(Stage):
    """pHash + CLIP image and text embeddings of every sample validate kept."""

    name = FEATURES
    version = "1"
    inputs = (VALIDATE, KEYWORD_FILTER)

    def __init__(self, embed: EmbedConfig, phash: PhashConfig | None = None):
        self.embed_cfg = embed
        self.phash_cfg = phash or PhashConfig()
        self._embedder: ClipEmbedder | None = None
        self._lock = threading.Lock()

    def params(self) -> dict[str, Any]:
        e = self.embed_cfg
        phash = {"method": self.phash_cfg.method}
        if self.phash_cfg.method == "fast":
            phash["draft_size"] = self.phash_cfg.draft_size
        try:
            backbone = weights_identity(e.model_name, e.pretrained, e.checkpoint)
        except FileNotFoundError:
            # run() raises the explanatory error; the runner's fingerprint step must not (it
            # would report a missing raw input instead).
            backbone = f"{e.model_name}@missing:{e.checkpoint or e.pretrained}"
        return {"backbone": backbone, "phash": phash}

    @property
    def embedder(self) -> ClipEmbedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = ClipEmbedder.from_config(self.embed_cfg)
            return self._embedder

    def run(self, ctx: StageContext) -> StageResult:
        validated = ctx.read_input(VALIDATE)
        candidates = ctx.read_input(KEYWORD_FILTER, columns=["uid", "caption"])
        table, counts = compute_features(
            ctx.root, validated, candidates, self.embedder, self.phash_cfg
        )
        return StageResult(output=table, counts=counts)


def compute_features(
    root: Any,
    validated: pa.Table,
    candidates: pa.Table,
    embedder: ClipEmbedder,
    phash_cfg: PhashConfig | None = None,
) -> tuple[pa.Table, dict[str, int]]:
    """Features of the rows of ``validated`` (uid, tar, and member or key), in its row order."""
    phash_cfg = phash_cfg or PhashConfig()
    uids = validated.column("uid").to_numpy().astype(np.uint64)
    n = len(uids)
    caption_of = dict(
        zip(
            candidates.column("uid").to_pylist(),
            candidates.column("caption").to_pylist(),
            strict=True,
        )
    )
    captions = [caption_of.get(int(u)) or "" for u in uids]

    # Validate names the exact member (``member``); without it, the webdataset ``key``.
    by_member = "member" in validated.column_names
    names = validated.column("member" if by_member else "key").to_pylist()
    by_tar: dict[str, dict[str, int]] = defaultdict(dict)
    for i, (tar, name) in enumerate(zip(validated.column("tar").to_pylist(), names, strict=True)):
        by_tar[tar][str(name)] = i

    hashes = np.zeros(n, np.uint64)
    done = np.zeros(n, bool)
    image_emb = np.zeros((n, embedder.dim), np.float16)
    batch_rows: list[int] = []
    batch_images: list[Image.Image] = []
    broken: list[str] = []

    def flush() -> None:
        if batch_rows:
            image_emb[batch_rows] = embedder.embed_images(batch_images)
            batch_rows.clear()
            batch_images.clear()

    for tar in sorted(by_tar):
        wanted = by_tar[tar]
        path = root.join(tar)
        stream = (
            iter_tar_members(root.fs, path, wanted.keys())
            if by_member
            else iter_tar_images(root.fs, path, wanted.keys())
        )
        for key, data in stream:
            row = wanted[key]
            try:
                image = Image.open(io.BytesIO(data))
                image = image.convert("RGB")
                if phash_cfg.method == "imagehash":
                    hashes[row] = phash_image(image)
                else:
                    hashes[row] = phash_bytes(data, "fast", phash_cfg.draft_size)
            except Exception as exc:  # validate said it decodes: a broken upstream
                broken.append(f"{tar}:{key} ({type(exc).__name__}: {exc})")
                continue
            done[row] = True
            batch_rows.append(row)
            batch_images.append(image)
            if len(batch_rows) >= embedder.batch_size:
                flush()
    flush()

    if not done.all():
        found = {s.split(" (")[0] for s in broken}
        missing = [
            f"{tar}:{key}"
            for tar, keys in by_tar.items()
            for key, row in keys.items()
            if not done[row] and f"{tar}:{key}" not in found
        ]
        raise RuntimeError(
            f"{len(broken)} images do not decode and {len(missing)} are missing from their tar "
            f"shards, though validate kept them: {(broken + missing)[:10]}"
        )

    text_emb = embedder.embed_texts(captions).astype(np.float16)
    table = pa.table(
        {
            "uid": pa.array(uids, pa.uint64()),
            "phash": pa.array(hashes, pa.uint64()),
            "image_embedding": float16_lists(image_emb),
            "text_embedding": float16_lists(text_emb),
        },
        schema=FEATURES_TABLE,
    )
    return table, {"images": n}
