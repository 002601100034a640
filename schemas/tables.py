"""Arrow schemas of every table the pipeline writes."""

from __future__ import annotations

import hashlib

import pyarrow as pa

# Ordered stage names: what the statistics table walks through.
KEYWORD_FILTER = "keyword_filter"
DOWNLOAD = "download"
VALIDATE = "validate"
FEATURES = "features"
DEDUP = "dedup"
OUTLIERS = "outliers"
GEOTAG = "geotag"
CAPTION = "caption"
PUB11_STAGES = (KEYWORD_FILTER, DOWNLOAD, VALIDATE, FEATURES, DEDUP, OUTLIERS, GEOTAG)


def sample_uid(*parts: str | None) -> int:
    """A stable 64-bit sample id: the first 8 bytes of the MD5 of the parts joined by US (0x1f).

    Equals DuckDB's ``('0x' || md5(concat_ws(chr(31), ...))[1:16])::UBIGINT``, so SQL stages and
    Python stages give the same uid for the same sample.
    """
    joined = "\x1f".join("" if p is None else p for p in parts)
    return int(hashlib.md5(joined.encode("utf-8", "surrogatepass")).hexdigest()[:16], 16)


LEDGER = pa.schema(
    [
        pa.field("uid", pa.uint64(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("partition", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),  # JSON: error text, duplicate_of and distance, scores
    ]
)

# After the keyword filter. Sources add their own useful columns after these.
CANDIDATES = pa.schema(
    [
        pa.field("uid", pa.uint64(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("partition", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("keywords", pa.list_(pa.string())),
    ]
)

DOWNLOADS = pa.schema(
    [
        pa.field("uid", pa.uint64(), nullable=False),
        pa.field("status", pa.string()),  # "success" or "failed"
        pa.field("error_class", pa.string()),  # dns, timeout, http_4xx, http_5xx, not_image, ...
        pa.field("error", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("bytes", pa.int64()),
        pa.field("tar", pa.string()),  # relative to the dataset root
        pa.field("key", pa.string()),
    ]
)

# After validation: where the final (original or normalised) bytes of each valid image are.
VALIDATED = pa.schema(
    [
        pa.field("uid", pa.uint64(), nullable=False),
        pa.field("width", pa.int64()),  # of the final (normalised) image
        pa.field("height", pa.int64()),
        pa.field("mode", pa.string()),  # final Pillow mode: RGB or L
        pa.field("original_mode", pa.string()),
        pa.field("format", pa.string()),  # of the final bytes: jpg, png, webp, gif, tiff, ...
        pa.field("normalized", pa.string()),  # steps applied (e.g. "cmyk,exif_transpose") or null
        pa.field("tar", pa.string()),  # tar holding the final bytes, relative to the dataset root
        pa.field("key", pa.string()),  # webdataset key inside that tar
        pa.field("member", pa.string()),  # exact tar member name of the image bytes
        pa.field("sha256", pa.string()),  # of the final bytes
        pa.field("bytes", pa.int64()),
    ]
)

FEATURES_TABLE = pa.schema(
    [
        pa.field("uid", pa.uint64(), nullable=False),
        pa.field("phash", pa.uint64()),
        pa.field("image_embedding", pa.list_(pa.float16())),
        pa.field("text_embedding", pa.list_(pa.float16())),
    ]
)

DECISIONS = pa.schema(
    [
        pa.field("uid", pa.uint64(), nullable=False),
        pa.field("keep", pa.bool_()),
        pa.field("reason", pa.string()),
        pa.field("duplicate_of", pa.uint64()),
        pa.field("distance", pa.float32()),
        pa.field("clip_score", pa.float32()),
        pa.field("rs_prob", pa.float32()),
    ]
)

PLACE = pa.struct(
    [
        pa.field("name", pa.string()),
        pa.field("country_code", pa.string()),
        pa.field("lat", pa.float64()),
        pa.field("lon", pa.float64()),
    ]
)

GEOTAGS = pa.schema(
    [
        pa.field("uid", pa.uint64(), nullable=False),
        pa.field("places", pa.list_(PLACE)),
        pa.field("lat", pa.float64()),
        pa.field("lon", pa.float64()),
        pa.field("utm_zone", pa.string()),
        pa.field("country_code", pa.string()),
    ]
)

SAMPLES = pa.schema(
    [
        pa.field("uid", pa.uint64(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("split", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("metadata", pa.string()),  # JSON
    ]
)
