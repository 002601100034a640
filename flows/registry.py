"""Which stage object runs a partition, built from the config."""

from __future__ import annotations

from schemas.config import BuildConfig
from schemas.tables import (
    DEDUP,
    DOWNLOAD,
    FEATURES,
    GEOTAG,
    KEYWORD_FILTER,
    OUTLIERS,
    PUB11_STAGES,
    VALIDATE,
)
from storage.root import DatasetRoot
from storage.stage import Partition, Stage

SEQUENTIAL_STAGES = frozenset({DEDUP})


class StageFactory:
    """Builds (and caches) the stage objects of one build."""

    def __init__(self, config: BuildConfig, root: DatasetRoot, retry_failed: bool = False):
        self.config = config
        self.retry_failed = retry_failed
        self.root = root
        self._cache: dict[tuple[str, str], Stage] = {}

    def enabled_stages(self) -> list[str]:
        wanted = self.config.run.stages
        unknown = set(wanted) - set(PUB11_STAGES)
        if unknown:
            raise ValueError(f"unknown stages in run.stages: {sorted(unknown)}")
        return [s for s in PUB11_STAGES if s in wanted]

    def make(self, stage: str, part: Partition) -> Stage:
        per_source = stage == KEYWORD_FILTER
        key = (stage, part.source if per_source else "")
        if key not in self._cache:
            self._cache[key] = self._build(stage, part.source)
        return self._cache[key]

    def _build(self, stage: str, source: str) -> Stage:
        cfg = self.config
        if stage == KEYWORD_FILTER:
            from tasks.keyword_filter import KeywordFilterStage

            src = next(s for s in cfg.sources if s.name == source)
            kw = cfg.keyword_filter
            return KeywordFilterStage(
                adapter=src.format,
                vocabulary=kw.vocabulary,
                max_caption_chars=kw.max_caption_chars,
                memory_limit=kw.duckdb_memory_limit,
                threads=kw.duckdb_threads,
            )
        if stage == DOWNLOAD:
            from tasks.download import DownloadStage

            return DownloadStage(cfg.download, retry_failed=self.retry_failed)
        if stage == VALIDATE:
            from tasks.validate import ValidateStage

            return ValidateStage(cfg.validate_)
        if stage == FEATURES:
            from tasks.features import FeaturesStage

            return FeaturesStage(cfg.embed, cfg.phash)
        if stage == DEDUP:
            from tasks.dedup import DedupStage

            return DedupStage(cfg.dedup)
        if stage == OUTLIERS:
            from tasks.embed import weights_identity
            from tasks.outliers import OutliersStage

            e = cfg.embed
            return OutliersStage(
                cfg.outliers, backbone=weights_identity(e.model_name, e.pretrained, e.checkpoint)
            )
        if stage == GEOTAG:
            from tasks.geotag import GeotagStage

            return GeotagStage(cfg.geotag, inputs=(KEYWORD_FILTER,))
        raise ValueError(f"stage {stage!r} is not available in this build")
