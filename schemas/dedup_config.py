"""Typed settings of the features stage (pHash + CLIP embeddings) and of deduplication."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EmbedConfig(BaseModel):
    """The open_clip backbone that embeds images and captions.

    The weights come from ``checkpoint`` (a local state-dict file, the usual case offline) or
    from ``pretrained`` (an open_clip tag such as ``laion2b_s34b_b79k``, or a local file path);
    nothing is ever downloaded when ``HF_HUB_OFFLINE`` is set.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    checkpoint: str | None = None
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto" (CUDA when available)
    batch_size: int = Field(64, ge=1)


class PhashConfig(BaseModel):
    """How the 64-bit perceptual hash is computed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "imagehash": plain ``imagehash.phash`` on the decoded image. "fast": JPEG draft-mode
    # decoding to a small size first, then the same hash (agreement measured in bench/).
    method: Literal["imagehash", "fast"] = "fast"
    # "fast" only: a JPEG is decoded at the smallest DCT scale at least this many pixels a side.
    draft_size: int = Field(128, ge=32)


class DedupConfig(BaseModel):
    """Near-duplicate search thresholds and index settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    use_phash: bool = True
    use_embedding: bool = True
    # Two samples are duplicates when their pHashes differ in at most this many of 64 bits.
    phash_radius: int = Field(8, ge=0, le=32)
    # ... or when the cosine similarity of their image embeddings is at least this (calibrate it
    # per backbone: remote-sensing tiles of one class are close in CLIP space).
    embedding_threshold: float = Field(0.97, gt=0.0, le=1.0)
    # Exact inner-product search up to this many indexed vectors, an IVF index above it.
    ivf_min_size: int = Field(100_000, ge=1)
    nlist: int | None = Field(None, ge=1)  # IVF lists; None: about 4 * sqrt(N)
    nprobe: int = Field(8, ge=1)
    # Who survives in a group of new samples (indexed survivors of earlier partitions always win).
    survivor_rule: Literal["area_caption_uid"] = "area_caption_uid"

    @model_validator(mode="after")
    def _some_method(self) -> DedupConfig:
        if not (self.use_phash or self.use_embedding):
            raise ValueError("enable at least one of use_phash, use_embedding")
        return self
