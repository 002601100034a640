"""Typed settings of outlier removal (image-text score and remote-sensing detector)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Rule = Literal["clip", "detector", "either", "both"]


class OutliersConfig(BaseModel):
    """When a sample that survived deduplication is removed as an outlier.

    Two scores per sample, both from the stored embeddings of the features stage:

    * ``clip_score``: cosine similarity of the image and caption embeddings. Low means the
      caption does not describe the image. The cut is ``clip_threshold`` (absolute), or the
      ``clip_percentile``-th percentile of the scores of the partition being scored
      (``clip_threshold_mode="percentile"``; a partition is one shard of one source, so this is
      a per-source percentile that never depends on other partitions; partitions with fewer
      than ``percentile_min_samples`` scored samples fall back to the absolute threshold).
    * ``rs_prob``: the remote-sensing detector's probability that the image is remote-sensing
      imagery (``detector_path``, trained by ``rs5m train-detector``). The cut is the
      detector's own saved threshold unless ``detector_threshold`` overrides it.

    ``rule`` says which low score makes an outlier: ``clip``, ``detector``, ``either`` (any of
    the two) or ``both`` (the two together). ``None`` means ``either`` when a detector is
    configured and ``clip`` otherwise (see :attr:`effective_rule`). A sample is low when its
    score is strictly below the cut.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: Rule | None = None
    clip_threshold_mode: Literal["absolute", "percentile"] = "absolute"
    # LAION's cut for OpenAI ViT-B/32 was 0.28; recalibrate for another backbone (the random
    # offline backbones give other score ranges: use the percentile mode there).
    clip_threshold: float = Field(0.28, ge=-1.0, le=1.0)
    clip_percentile: float = Field(5.0, gt=0.0, lt=100.0)
    percentile_min_samples: int = Field(50, ge=1)
    detector_path: str | None = None
    detector_threshold: float | None = Field(None, ge=0.0, le=1.0)

    @property
    def effective_rule(self) -> Rule:
        if self.rule is not None:
            return self.rule
        return "either" if self.detector_path else "clip"

    @property
    def uses_detector(self) -> bool:
        return self.effective_rule != "clip"

    @model_validator(mode="after")
    def _detector_when_needed(self) -> OutliersConfig:
        if self.rule in ("detector", "either", "both") and not self.detector_path:
            raise ValueError(
                f"rule {self.rule!r} needs a remote-sensing detector: set detector_path "
                "(train one with `rs5m train-detector`) or use rule 'clip'"
            )
        return self
