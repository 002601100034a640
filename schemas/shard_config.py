"""Typed settings of the shard step (webdataset tars + manifest)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ShardConfig(BaseModel):
    """How kept samples become ``{branch}-{split}-NNNN.tar`` shards.

    The train/validation split of a sample depends only on its uid, ``split_salt`` and
    ``val_ratio``, so it never changes when the dataset grows. Changing ``val_ratio`` or
    ``split_salt`` moves samples between splits: that needs a ``reshard`` build.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples_per_shard: int = Field(
        10_000, ge=1, description="samples per tar (the last may be short)"
    )
    val_ratio: float = Field(0.01, ge=0.0, le=1.0, description="share of samples in the val split")
    split_salt: str = Field("rs5m-split-v1", description="mixed into the split hash")
    shard_dir: str = Field("shards", description="folder in the dataset root for tars + manifest")
    index_digits: int = Field(4, ge=1, le=9, description="zero-padded shard index width (NNNN)")
    check_sha256: bool = Field(
        True, description="compare the image bytes with the download sha256 when it is known"
    )
    check_image_header: bool = Field(
        True, description="open every image header with PIL; unreadable ones go to the ledger"
    )
