"""Geo-tagging throughput: captions per second per core of each available backend.

Runs every backend over the shared fixture captions (web alt-text from img2dataset's
test_10000, CC3M validation, RSICD/UCM/Sydney remote-sensing captions) in one process, so one
core, and prints a table. CPU time (``time.process_time``) gives the per-core rate; wall time
is printed beside it. Also times reverse geocoding + UTM zones (points per second).

    python bench/geotag.py                      # all fixture captions, every available backend
    python bench/geotag.py --limit 2000 --backend gazetteer
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from tasks.geo.coords import reverse_countries, utm_zone  # noqa: E402
from tasks.geo.gazetteer import Gazetteer  # noqa: E402
from tasks.geotag import BACKENDS, extract_places, nltk_models_available  # noqa: E402


def load_captions(fixtures: Path) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    caps = fixtures / "rs_captions"
    out = {
        "web (test_10000)": [
            t
            for t in pq.read_table(fixtures / "metadata" / "test_10000.parquet")
            .column("TEXT")
            .to_pylist()
            if t
        ],
        "cc3m": [
            line.split("\t")[0]
            for line in (fixtures / "metadata" / "Validation_GCC-1.1.0-Validation.tsv")
            .read_text(encoding="utf-8")
            .splitlines()
        ],
    }
    rs = []
    for name in ("dataset_ucm_modified.json", "dataset_sydney_modified.json"):
        images = json.loads((caps / "ucm_sydney_captions" / name).read_text())["images"]
        rs += [s["raw"] for im in images for s in im["sentences"]]
    for name in ("rsicd_captions_test_coco.json", "rsicd_captions_val_coco.json"):
        rs += [
            a["caption"]
            for a in json.loads((caps / "rsicd_captions" / name).read_text())["annotations"]
        ]
    out["remote sensing (rsicd+ucm+sydney)"] = rs
    return out


def bench_backend(backend: str, captions: list[str]) -> tuple[float, float, int]:
    cpu, wall = time.process_time(), time.perf_counter()
    with_place = sum(bool(extract_places(c, backend)) for c in captions)
    return time.process_time() - cpu, time.perf_counter() - wall, with_place


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fixtures", type=Path, default=PROJECT.parent / "shared" / "fixtures")
    parser.add_argument("--backend", choices=BACKENDS, action="append")
    parser.add_argument("--limit", type=int, default=0, help="captions per set (0: all)")
    parser.add_argument("--points", type=int, default=100_000, help="points to reverse-geocode")
    args = parser.parse_args()
    if not args.fixtures.is_dir():
        sys.exit(f"fixtures not found at {args.fixtures}")

    sets = load_captions(args.fixtures)
    if args.limit:
        sets = {k: v[: args.limit] for k, v in sets.items()}
    t0 = time.perf_counter()
    Gazetteer.load(15000)
    print(f"gazetteer load: {time.perf_counter() - t0:.2f} s (once per process)\n")

    print("| backend | captions | n | with a place | captions/s/core (CPU) | captions/s (wall) |")
    print("|---|---|---:|---:|---:|---:|")
    for backend in args.backend or list(BACKENDS):
        if backend == "nltk" and not nltk_models_available():
            print("| nltk | (skipped: NLTK models not installed; `rs5m setup-nltk`) | | | | |")
            continue
        extract_places("warm up in Paris", backend)
        for name, captions in sets.items():
            cpu, wall, with_place = bench_backend(backend, captions)
            print(
                f"| {backend} | {name} | {len(captions):,} | {with_place / len(captions):.1%} "
                f"| {len(captions) / cpu:,.0f} | {len(captions) / wall:,.0f} |"
            )

    rng = random.Random(0)
    lat = [rng.uniform(-60, 75) for _ in range(args.points)]
    lon = [rng.uniform(-180, 180) for _ in range(args.points)]
    reverse_countries(lat[:10], lon[:10])  # load the KD-tree
    cpu = time.process_time()
    reverse_countries(lat, lon)
    zones = [utm_zone(a, b) for a, b in zip(lat, lon, strict=True)]
    cpu = time.process_time() - cpu
    print(
        f"\nreverse geocoding + UTM zone: {len(zones) / cpu:,.0f} points/s/core "
        f"({len(zones):,} random points)"
    )


if __name__ == "__main__":
    main()
