"""``rs5m demo``: the whole pipeline on a bundled sample, served over loopback HTTP.

The demo writes LAION- and COYO-format metadata whose URLs point at a local image server (port
chosen automatically) serving the bundled EuroSAT tiles and CC0 photos, plus the ways the web
fails (404, 500, HTML served as an image, truncated and oversized images, duplicates, photos
captioned as aerial views), then runs ``rs5m build`` on it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

DEMO_PORT = 47_611
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
IMAGES = DEMO_DATA / "images"

CLASS_CAPTIONS = {
    "AnnualCrop": "Sentinel-2 satellite image of annual crop fields near Toulouse, France",
    "Forest": "aerial view of a dense forest in Finland",
    "HerbaceousVegetation": "satellite view of herbaceous vegetation and scrubland in Portugal",
    "Highway": "aerial photo of a highway crossing farmland near Lyon",
    "Industrial": "satellite image of an industrial area with warehouses in Rotterdam",
    "Pasture": "aerial view of green pastures in Ireland",
    "PermanentCrop": "Sentinel-2 image of orchards and vineyards near Valencia, Spain",
    "Residential": "aerial view of a residential neighbourhood in Berlin",
    "River": "satellite image of the Danube winding through fields near Budapest",
    "SeaLake": "aerial view of the shore of Lake Geneva near Lausanne",
}
PHOTO_CAPTIONS = {
    "astronaut": "portrait of an astronaut in front of the flag",
    "camera": "a photographer with an old camera in the park",
    "chelsea": "a ginger cat looking at the camera",
    "coffee": "a cup of coffee on a saucer",
    "coins": "old coins on a table",
    "rocket": "rocket on the launch pad",
    "clock_motion": "a clock on the wall",
    "motorcycle_left": "a red motorcycle",
}
# Photos captioned as remote-sensing imagery: the keyword filter keeps them, the outlier
# stage should not.
MISCAPTIONED = {
    "coffee": "aerial view of a coffee plantation",
    "chelsea": "satellite image of my cat's favourite garden",
    "motorcycle_left": "drone footage of a motorcycle race from above",
}
FALSE_FRIENDS = {
    "camera": "new satellite dish installed on the roof",
    "astronaut": "aerial yoga class for beginners",
}


def _rows(base: str, tiles: list[Path], start: int, stop: int) -> list[dict[str, Any]]:
    rows = []
    for tile in tiles[start:stop]:
        cls, idx = tile.stem.rsplit("_", 1)
        rows.append(
            {
                "url": f"{base}/files/eurosat/{tile.name}",
                "text": f"{CLASS_CAPTIONS[cls]} (tile {idx})",
                "width": 64,
                "height": 64,
            }
        )
    return rows


def _write_if_changed(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)``; replace ``path`` only if the bytes differ, so that an
    unchanged metadata file keeps its fingerprint and the rebuild skips it."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    if path.exists() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        tmp.replace(path)


def write_demo_metadata(folder: Path, base: str) -> dict[str, list[Path]]:
    """LAION-format parquet files and a COYO-format CSV pointing at ``base``."""
    folder.mkdir(parents=True, exist_ok=True)
    tiles = sorted((IMAGES / "eurosat").glob("*.jpg"))
    photos = {p.stem: p for p in sorted((IMAGES / "photos").glob("*.jpg"))}

    laion_a = _rows(base, tiles, 0, 16)
    laion_b = _rows(base, tiles, 16, 30)
    for stem, caption in PHOTO_CAPTIONS.items():
        laion_a.append(
            {
                "url": f"{base}/files/photos/{photos[stem].name}",
                "text": caption,
                "width": 384,
                "height": 384,
            }
        )
    for stem, caption in MISCAPTIONED.items():
        laion_b.append(
            {
                "url": f"{base}/files/photos/{photos[stem].name}",
                "text": caption,
                "width": 384,
                "height": 384,
            }
        )
    for stem, caption in FALSE_FRIENDS.items():
        laion_b.append(
            {
                "url": f"{base}/files/photos/{photos[stem].name}",
                "text": caption,
                "width": 384,
                "height": 384,
            }
        )
    failures = {
        "404": "aerial view of a missing harbour",
        "500": "satellite image of a broken server farm",
        "html-as-image": "aerial photo that is really a web page",
    }
    for name, caption in failures.items():
        laion_b.append({"url": f"{base}/special/{name}", "text": caption, "width": 0, "height": 0})
    for name, caption in {
        "problems/truncated.jpg": "aerial view of a truncated download",
        "problems/one_pixel.png": "satellite image one pixel wide",
        "problems/bomb.png": "aerial mosaic of enormous size",
    }.items():
        laion_b.append({"url": f"{base}/files/{name}", "text": caption, "width": 0, "height": 0})

    paths: dict[str, list[Path]] = {"laion": [], "coyo": []}
    for i, rows in enumerate((laion_a, laion_b)):
        table = pa.table(
            {
                "URL": [r["url"] for r in rows],
                "TEXT": [r["text"] for r in rows],
                "WIDTH": [r["width"] for r in rows],
                "HEIGHT": [r["height"] for r in rows],
                "similarity": [0.3] * len(rows),
            }
        )
        path = folder / f"laion-part-{i:05d}.parquet"
        _write_if_changed(path, lambda tmp, t=table: pq.write_table(t, tmp))
        paths["laion"].append(path)

    # COYO: the remaining tiles, plus copies of LAION's (cross-source duplicates)
    coyo = _rows(base, tiles, 30, 40) + [
        {**r, "text": r["text"].replace("(tile", "(copy of tile")} for r in laion_a[:4]
    ]
    table = pa.table(
        {
            "id": list(range(1, len(coyo) + 1)),
            "url": [r["url"] for r in coyo],
            "text": [r["text"] for r in coyo],
            "width": [r["width"] for r in coyo],
            "height": [r["height"] for r in coyo],
            "clip_similarity_vitb32": [0.3] * len(coyo),
        }
    )
    path = folder / "coyo-part-00000.csv"
    _write_if_changed(path, lambda tmp: pacsv.write_csv(table, tmp))
    paths["coyo"].append(path)
    return paths


def prepare_site(folder: Path) -> Path:
    """The folder the demo's image server serves: bundled images and broken ones."""
    from rs5m.image_server import write_problem_images

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(IMAGES, folder, ignore=shutil.ignore_patterns("*.md"))
    write_problem_images(folder / "problems", source_image=str(folder / "eurosat" / "Forest_1.jpg"))
    return folder


def demo_config_toml(inputs: Path, models: dict[str, str]) -> str:
    """The demo's build configuration (written beside its metadata, for users to read)."""
    return f"""# rs5m demo build: written by `rs5m demo`; a template for your own builds.
[[sources]]
name = "laion2b"
format = "laion2b"
paths = ["{inputs}/laion-part-*.parquet"]

[[sources]]
name = "coyo700m"
format = "coyo700m"
paths = ["{inputs}/coyo-part-*.csv"]

[download]
allow_hosts = ["127.0.0.1"]   # the demo's own loopback image server; off by default
processes_count = 1
thread_count = 8
timeout = 3
total_timeout = 10
number_sample_per_shard = 16

[validate]
min_side = 16

[embed]
model_name = "rs5m-tiny-vit"    # random weights: nothing pretrained can be downloaded here
pretrained = ""
checkpoint = "{models["checkpoint"]}"
batch_size = 32

[dedup]
# a random backbone maps every image to nearly the same embedding: only copies count as alike
embedding_threshold = 0.99999

[outliers]
rule = "detector"                # a random backbone's image-text score means nothing
detector_path = "{models["detector"]}"

[shard]
samples_per_shard = 16
val_ratio = 0.1
"""


def prepare_models(folder: Path, eurosat: Path, photos: Path) -> dict[str, str]:
    """A tiny random CLIP checkpoint and a remote-sensing detector trained on the demo images."""
    from flows.train_detector import train_detector_flow
    from tasks.embed import create_random_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "rs5m-tiny-vit.pt"
    if not checkpoint.exists():
        create_random_checkpoint("rs5m-tiny-vit", str(checkpoint), seed=0)
    detector = folder / "rs-detector.npz"
    if not detector.exists():
        train_detector_flow(
            positive_dirs=[str(eurosat)],
            negative_dirs=[str(photos)],
            out_path=str(detector),
            model_name="rs5m-tiny-vit",
            checkpoint=str(checkpoint),
            test_fraction=0.25,
            crops_per_image=8,  # few bundled photos: random crops add training rows
        )
    return {"checkpoint": str(checkpoint), "detector": str(detector)}


def run_demo(root: str, show_progress: bool = True) -> int:
    """Serve the bundled images on 127.0.0.1, write the metadata, build, print statistics."""
    from rs5m.cli import run_build
    from rs5m.image_server import ImageServer
    from schemas.config import load_config

    root_path = Path(root).resolve()
    work = root_path.parent / f"{root_path.name}-inputs"
    site = prepare_site(work / "www")
    models = prepare_models(work / "models", site / "eurosat", site / "photos")
    # A fixed preferred port keeps the URLs, hence the sample ids, the same from one demo run
    # to the next, so that a second run shows the incremental rebuild doing nothing.
    with ImageServer(site, port=DEMO_PORT) as server:
        base = server.base_url.rstrip("/")
        write_demo_metadata(work / "metadata", base)
        config_path = work / "build.toml"
        config_path.write_text(demo_config_toml(work / "metadata", models))
        print(f"demo: images served at {base}, config {config_path}, dataset root {root_path}")
        code = run_build(load_config(config_path), str(root_path), show_progress=show_progress)
    print(
        f"\nNext: `rs5m stats --root {root_path}`, `rs5m status --root {root_path}`, "
        f"`rs5m verify --root {root_path}`."
    )
    return code
