"""The typed build configuration: a TOML file, overridden by ``RS5M_*`` environment variables.

Environment overrides use ``__`` between levels, e.g.
``RS5M_KEYWORD_FILTER__MAX_CAPTION_CHARS=2048`` or ``RS5M_RUN__WORKERS=4``.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from schemas.dedup_config import DedupConfig, EmbedConfig, PhashConfig
from schemas.download_config import DownloadConfig, ValidateConfig
from schemas.geotag_config import GeotagConfig
from schemas.outliers_config import OutliersConfig
from schemas.shard_config import ShardConfig
from schemas.sources import ADAPTERS
from schemas.tables import PUB11_STAGES

_SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


class SourceConfig(BaseModel):
    """One metadata source: its adapter and the files (glob patterns) that hold its rows."""

    name: str = Field(description="label used in partitions and statistics, e.g. 'laion2b'")
    format: str = Field(description="adapter name: " + ", ".join(sorted(ADAPTERS)))
    paths: list[str] = Field(description="files or glob patterns; relative to the config file")
    branch: str = "pub11"

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _SOURCE_NAME.match(v):
            raise ValueError(f"source name {v!r}: use lower-case letters, digits, '_' or '-'")
        return v

    @field_validator("format")
    @classmethod
    def _format_known(cls, v: str) -> str:
        if v not in ADAPTERS:
            raise ValueError(f"unknown format {v!r}; known: {', '.join(sorted(ADAPTERS))}")
        return v

    def files(self, base_dir: Path) -> list[str]:
        """The metadata files this source has now, sorted; a pattern matching nothing is kept
        as a literal path so that the missing file is reported, not silently ignored."""
        out: list[str] = []
        for pattern in self.paths:
            if "://" in pattern:
                out.append(pattern)
                continue
            full = pattern if os.path.isabs(pattern) else str(base_dir / pattern)
            out.extend(sorted(glob.glob(full)) if glob.has_magic(full) else [full])
        return sorted(dict.fromkeys(out))


class KeywordFilterConfig(BaseModel):
    vocabulary: str | None = Field(None, description="TOML vocabulary; None = the bundled one")
    max_caption_chars: int = Field(4096, ge=16, description="longer captions go to the ledger")
    duckdb_memory_limit: str = "1GB"
    duckdb_threads: int = Field(2, ge=1)


class RunConfig(BaseModel):
    stages: list[str] = Field(
        default_factory=lambda: list(PUB11_STAGES), description="PUB11 stages to run, in order"
    )
    shard: bool = Field(True, description="write webdataset shards after the stages")
    workers: int = Field(2, ge=1, description="partitions processed at once per stage")
    retries: int = Field(0, ge=0, description="Prefect retries of a failed partition")


class BuildConfig(BaseSettings):
    """Everything a build needs. Loaded by :func:`load_config`."""

    model_config = SettingsConfigDict(
        env_prefix="RS5M_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=None,
        populate_by_name=True,
    )

    sources: list[SourceConfig] = Field(default_factory=list)
    keyword_filter: KeywordFilterConfig = Field(default_factory=KeywordFilterConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    phash: PhashConfig = Field(default_factory=PhashConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    outliers: OutliersConfig = Field(default_factory=OutliersConfig)
    geotag: GeotagConfig = Field(default_factory=GeotagConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    base_dir: Path = Field(Path("."), description="where relative paths resolve (config's dir)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = os.environ.get("_RS5M_CONFIG_FILE")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> BuildConfig:
    """Read a TOML config (environment variables override it, then ``overrides``)."""
    if path is None:
        return BuildConfig(**overrides)
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    os.environ["_RS5M_CONFIG_FILE"] = str(path)
    try:
        overrides.setdefault("base_dir", path.parent)
        return BuildConfig(**overrides)
    finally:
        os.environ.pop("_RS5M_CONFIG_FILE", None)
