"""Source adapters: how each PUB11 source's published metadata maps onto the candidates table.

Each adapter names the source's real columns (or, for headerless text files, the column order
the publishers use) and gives DuckDB expressions for the candidate fields ``url``, ``caption``,
``width`` and ``height``; the source's own useful columns (similarity, licence, NSFW scores,
coordinates, ...) are carried along under their original names, lower-cased.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

FileFormat = Literal["parquet", "csv", "tsv"]


@dataclass(frozen=True)
class SourceAdapter:
    """Column mapping of one web source.

    ``url``/``caption``/``width``/``height`` are DuckDB expressions over the source's columns
    (quoted names). ``required`` columns must exist (a missing one fails the partition with a
    message naming the file and the column). ``keep`` columns are copied when present.
    ``headerless`` gives the column names of CSV/TSV files published without a header.
    """

    name: str
    title: str
    url: str
    caption: str
    required: tuple[str, ...]
    width: str | None = None
    height: str | None = None
    keep: tuple[str, ...] = ()
    headerless: tuple[str, ...] | None = None
    string_columns: tuple[str, ...] = field(default=())
    filter: str | None = None  # an extra row filter (e.g. WIT's English rows)
    rename: dict[str, str] = field(default_factory=dict)  # kept column -> candidates name

    def kept_name(self, column: str) -> str:
        """The candidates column a kept source column becomes (lower-cased unless renamed)."""
        return self.rename.get(column, column.lower())

    def __post_init__(self) -> None:
        if not self.string_columns:
            object.__setattr__(self, "string_columns", self.required)


def _q(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def _first(*columns: str) -> str:
    """The first non-empty of several text columns."""
    return "coalesce(" + ", ".join(f"nullif(trim({_q(c)}), '')" for c in columns) + ")"


ADAPTERS: dict[str, SourceAdapter] = {
    a.name: a
    for a in [
        SourceAdapter(
            name="laion2b",
            title="LAION-2B",
            url=_q("URL"),
            caption=_q("TEXT"),
            width=_q("WIDTH"),
            height=_q("HEIGHT"),
            required=("URL", "TEXT"),
            keep=("similarity", "punsafe", "pwatermark", "LICENSE", "NSFW", "LANGUAGE", "hash"),
        ),
        SourceAdapter(
            name="laion400m",
            title="LAION-400M",
            url=_q("URL"),
            caption=_q("TEXT"),
            width=_q("WIDTH"),
            height=_q("HEIGHT"),
            required=("URL", "TEXT"),
            keep=("SAMPLE_ID", "similarity", "LICENSE", "NSFW"),
        ),
        SourceAdapter(
            name="laion_coco",
            title="LAION-COCO",
            url=_q("URL"),
            caption=_q("top_caption"),
            width=_q("WIDTH"),
            height=_q("HEIGHT"),
            required=("URL", "top_caption"),
            keep=(
                "TEXT",
                "all_captions",
                "all_similarities",
                "similarity",
                "punsafe",
                "pwatermark",
            ),
        ),
        SourceAdapter(
            name="coyo700m",
            title="COYO-700M",
            url=_q("url"),
            caption=_q("text"),
            width=_q("width"),
            height=_q("height"),
            required=("url", "text"),
            keep=(
                "id",
                "image_phash",
                "clip_similarity_vitb32",
                "clip_similarity_vitl14",
                "nsfw_score_opennsfw2",
                "nsfw_score_gantman",
                "watermark_score",
                "aesthetic_score_laion_v2",
            ),
        ),
        SourceAdapter(
            name="wit",
            title="WIT",
            url=_q("image_url"),
            caption=_first(
                "caption_reference_description",
                "caption_alt_text_description",
                "caption_attribution_description",
            ),
            width=_q("original_width"),
            height=_q("original_height"),
            required=("image_url", "caption_reference_description"),
            keep=("language", "page_url", "page_title", "mime_type"),
            filter="coalesce(\"language\", 'en') = 'en'",
        ),
        SourceAdapter(
            name="yfcc15m",
            title="YFCC15M",
            url=_q("downloadurl"),
            caption=(
                "nullif(trim(concat_ws('. ', nullif(trim(url_decode(replace(\"title\", '+', ' '))),"
                " ''), nullif(trim(url_decode(replace(\"description\", '+', ' '))), ''))), '')"
            ),
            required=("downloadurl", "title", "description"),
            keep=("photoid", "longitude", "latitude", "accuracy", "licensename", "datetaken"),
            rename={"latitude": "lat", "longitude": "lon"},
        ),
        SourceAdapter(
            name="cc12m",
            title="CC12M",
            url=_q("url"),
            caption=_q("caption"),
            required=("url", "caption"),
            headerless=("url", "caption"),
        ),
        SourceAdapter(
            name="redcaps",
            title="RedCaps",
            url=_q("url"),
            caption=_q("caption"),
            required=("url", "caption"),
            keep=("image_id", "raw_caption", "subreddit", "score", "created_utc", "permalink"),
        ),
        SourceAdapter(
            name="cc3m",
            title="CC3M",
            url=_q("url"),
            caption=_q("caption"),
            required=("caption", "url"),
            headerless=("caption", "url"),
        ),
        SourceAdapter(
            name="sbu",
            title="SBU Captions",
            url=_q("image_url"),
            caption=_q("caption"),
            required=("image_url", "caption"),
            keep=("user_id",),
        ),
        SourceAdapter(
            name="vg",
            title="Visual Genome",
            url=_q("url"),
            caption=_q("phrase"),
            width=_q("width"),
            height=_q("height"),
            required=("url", "phrase"),
            keep=("image_id", "region_id", "x", "y", "coco_id", "flickr_id"),
        ),
    ]
}


def get_adapter(name: str) -> SourceAdapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"unknown source format {name!r}; known: {known}") from None


def detect_format(path: str) -> FileFormat:
    """Parquet, CSV or TSV from the file name (``.gz`` allowed on CSV/TSV)."""
    name = path.lower()
    name = re.sub(r"\.(gz|gzip|zst)$", "", name)
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    if name.endswith(".tsv") or name.endswith(".txt"):
        return "tsv"
    if name.endswith(".csv"):
        return "csv"
    raise ValueError(f"{path}: unknown metadata file type (expected .parquet, .csv, .tsv[.gz])")


def relation_sql(adapter: SourceAdapter, path: str, fmt: FileFormat) -> str:
    """A DuckDB table function reading ``path`` with every column as published."""
    lit = "'" + path.replace("'", "''") + "'"
    if fmt == "parquet":
        return f"read_parquet({lit}, file_row_number=true)"
    delim = "\\t" if fmt == "tsv" else ","
    opts = [f"delim='{delim}'", "strict_mode=false", "parallel=true"]
    if fmt == "tsv":
        opts.append("quote=''")  # web captions hold bare quotes
    if adapter.headerless:
        cols = ", ".join(f"'{c}': 'VARCHAR'" for c in adapter.headerless)
        opts += ["header=false", f"columns={{{cols}}}"]
    else:
        opts += ["header=true", "all_varchar=true"]
    return f"read_csv({lit}, {', '.join(opts)})"
