"""Geo statistics over geotag outputs: places per source, per country, a map of locations."""

from __future__ import annotations

import io
import os

import duckdb
import fsspec
import pyarrow as pa


def _connect() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    )


def places_per_source(geotags: pa.Table, sources: pa.Table) -> pa.Table:
    """Per source: samples, samples naming at least one place (and their share), place mentions,
    samples with source coordinates. ``sources`` maps ``uid`` to ``source`` (the candidates
    table, or any table with both columns); geotag rows without a source are not counted."""
    with _connect() as con:
        con.register("g", geotags.select(["uid", "places", "lat", "lon"]))
        con.register("s", sources.select(["uid", "source"]))
        return con.sql(
            """
            SELECT s.source,
                   count(*)::BIGINT AS samples,
                   count(*) FILTER (WHERE len(g.places) > 0)::BIGINT AS with_place,
                   round(count(*) FILTER (WHERE len(g.places) > 0) / count(*), 4)
                       AS share_with_place,
                   coalesce(sum(len(g.places)), 0)::BIGINT AS place_mentions,
                   count(*) FILTER (WHERE g.lat IS NOT NULL AND g.lon IS NOT NULL)::BIGINT
                       AS with_coordinates
            FROM g JOIN (SELECT DISTINCT uid, source FROM s) s USING (uid)
            GROUP BY s.source ORDER BY s.source
            """
        ).to_arrow_table()


def places_per_country(geotags: pa.Table) -> pa.Table:
    """Per country code: place mentions in captions, samples naming a place there, and samples
    whose source coordinates lie there. Continents (no country) count under a null code."""
    with _connect() as con:
        con.register("g", geotags.select(["uid", "places", "country_code"]))
        return con.sql(
            """
            WITH named AS (
                SELECT uid, unnest(places).country_code AS country_code FROM g
            ), n AS (
                SELECT country_code, count(*)::BIGINT AS place_mentions,
                       count(DISTINCT uid)::BIGINT AS samples_naming
                FROM named GROUP BY ALL
            ), l AS (
                SELECT country_code, count(*)::BIGINT AS samples_located
                FROM g WHERE country_code IS NOT NULL GROUP BY ALL
            )
            SELECT coalesce(n.country_code, l.country_code) AS country_code,
                   coalesce(n.place_mentions, 0)::BIGINT AS place_mentions,
                   coalesce(n.samples_naming, 0)::BIGINT AS samples_naming,
                   coalesce(l.samples_located, 0)::BIGINT AS samples_located
            FROM n FULL OUTER JOIN l ON n.country_code IS NOT DISTINCT FROM l.country_code
            ORDER BY place_mentions + samples_located DESC, country_code NULLS LAST
            """
        ).to_arrow_table()


def write_location_map(
    geotags: pa.Table, png_path: str | os.PathLike[str], title: str | None = None
) -> str:
    """A PNG scatter of sample locations on a plain lon/lat grid: source coordinates and the
    places captions name. ``png_path`` is a local path or an fsspec URL. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with _connect() as con:
        con.register("g", geotags.select(["uid", "places", "lat", "lon"]))
        meta = con.execute(
            "SELECT lon, lat FROM g WHERE lat IS NOT NULL AND lon IS NOT NULL"
        ).fetchnumpy()
        named = con.execute(
            """SELECT p.lon AS lon, p.lat AS lat
               FROM (SELECT unnest(places) AS p FROM g) WHERE p.lat IS NOT NULL"""
        ).fetchnumpy()

    fig = Figure(figsize=(12, 6.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(named["lon"]):
        ax.scatter(
            named["lon"],
            named["lat"],
            s=6,
            alpha=0.5,
            c="tab:orange",
            linewidths=0,
            label=f"places named in captions ({len(named['lon']):,})",
        )
    if len(meta["lon"]):
        ax.scatter(
            meta["lon"],
            meta["lat"],
            s=6,
            alpha=0.5,
            c="tab:blue",
            linewidths=0,
            label=f"source coordinates ({len(meta['lon']):,})",
        )
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_xticks(range(-180, 181, 30))
    ax.set_yticks(range(-90, 91, 30))
    ax.set_aspect("equal")
    ax.grid(True, linewidth=0.4, alpha=0.6)
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(title or f"sample locations ({geotags.num_rows:,} samples)")
    if len(named["lon"]) or len(meta["lon"]):
        ax.legend(loc="lower left", markerscale=3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    path = os.fspath(png_path)
    with fsspec.open(path, "wb", auto_mkdir=True) as f:
        f.write(buf.getvalue())
    return path
