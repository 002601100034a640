"""Typed settings of the download stage (img2dataset) and of the validate stage (Pillow)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Error classes of a failed download. Transient ones are refetched by ``--retry-failed``.
ERROR_CLASSES = (
    "dns",
    "timeout",
    "http_4xx",
    "http_5xx",
    "not_image",
    "too_large",
    "too_small",
    "refused_address",
    "bad_url",
    "redirect_loop",
    "connection",
    "disallowed",  # X-Robots-Tag noai / noindex opt-out
    "other",
)
TRANSIENT_ERROR_CLASSES = ("timeout", "http_5xx", "connection")

# Reasons the validate stage removes an image for.
INVALID_REASONS = ("empty", "truncated", "too_many_pixels", "too_small", "unreadable")


class DownloadConfig(BaseModel):
    """How candidates are fetched. Every img2dataset option we pass is here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Keep the bytes exactly as served (img2dataset ``disable_all_reencoding``): no decode, no
    # resize; the shard stage copies them unchanged. When False, img2dataset decodes, resizes
    # and re-encodes with the four options below.
    keep_original_bytes: bool = True
    image_size: int = Field(512, ge=1)
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"] = (
        "keep_ratio"
    )
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)
    min_image_size: int = Field(0, ge=0)  # img2dataset's own filter (only when re-encoding)

    processes_count: int = Field(1, ge=1)
    thread_count: int = Field(64, ge=1)
    number_sample_per_shard: int = Field(1000, ge=1)  # also the resume granularity
    timeout: float = Field(10.0, gt=0)  # seconds per socket operation (connect, each read)
    total_timeout: float = Field(60.0, gt=0)  # seconds for the whole response body
    retries: int = Field(0, ge=0)  # immediate retries inside img2dataset
    user_agent_token: str | None = "rs5m-curator"
    # X-Robots-Tag directives that make img2dataset refuse an image (opt-outs are respected).
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    extract_exif: bool = False

    # Safety (SSRF): by default only hosts resolving to public addresses are fetched, over
    # http(s). Entries are host names, IP addresses or CIDR networks, e.g. ["127.0.0.1"].
    allow_hosts: tuple[str, ...] = ()
    max_bytes: int = Field(32 * 1024 * 1024, ge=1)  # response size cap
    max_redirects: int = Field(5, ge=0)


class ValidateConfig(BaseModel):
    """Which downloaded images are usable, and how the usable ones are normalised."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_side: int = Field(32, ge=1)  # smaller width or height -> too_small
    max_pixels: int = Field(40_000_000, ge=1)  # width * height above -> too_many_pixels
    # Modes kept as they are; every other mode (CMYK, P, I;16, RGBA, LA, 1, ...) becomes RGB.
    keep_modes: tuple[str, ...] = ("RGB", "L")
    apply_exif_orientation: bool = True
    jpeg_quality: int = Field(95, ge=1, le=100)  # re-encoding of normalised JPEG sources
    # Normalised images: JPEG sources are re-encoded as JPEG, others as PNG (lossless).
    normalized_format: Literal["auto", "jpg", "png"] = "auto"
