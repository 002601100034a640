"""Loader benchmark: images per second per worker, ours against a textbook webdataset pipeline.

Both loaders read the same shards, written by the real shard step (``tasks.shard.write_shards``)
from real images, in the same process, interleaved (ref, ours, ref, ours, ...) so that load from
other processes on the machine hits both alike; the median of the repeats is reported.

* ``reference``:  ``wds.WebDataset(urls).decode("pil").to_tuple("jpg;png;webp", "txt")
  .map_tuple(T)`` with ``T = Compose(Resize(S, bicubic), CenterCrop(S), ToTensor(), Normalize)``
  (open_clip's eval transform), batched by ``WebLoader(batch_size=B)``.
* ``reference-train``: the same with open_clip's train transform
  (``RandomResizedCrop(S, scale=(0.9, 1), bicubic)``).
* ``ours-eval`` / ``ours-train``: ``tasks.loader.make_loader`` with ``augment`` off / on
  (random resized crop, flips, 90-degree rotations) and a shuffle buffer of 1000.
* ``ours-train-uint8``: the same with ``normalize=False`` (uint8 batches, normalised on the
  GPU by ``tasks.loader.normalize_on_device``).

Two rates per loader: images per wall-clock second (divided by the workers: "per worker"),
and images per CPU-second (main process + the loader's workers, from /proc), which is what
one fully busy worker delivers and does not depend on what else loads the machine.

Usage::

    python bench/loader.py                         # shards from ../shared/fixtures images
    python bench/loader.py --workers 1 2 --samples 2000 --repeats 3 --out bench/loader.json
    python bench/loader.py --images DIR            # any folder of jpg/png/webp images
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from schemas.shard_config import ShardConfig  # noqa: E402
from storage.root import DatasetRoot  # noqa: E402
from tasks.loader import CLIP_MEAN, CLIP_STD, make_loader  # noqa: E402
from tasks.shard import SHARD_INPUT, write_shards  # noqa: E402

FIXTURES = PROJECT.parent / "shared" / "fixtures"
DEFAULT_IMAGE_DIRS = (
    FIXTURES / "natural_photos" / "imagenet",  # web photos, ~500x375 JPEG
    FIXTURES / "aid_150px",  # aerial scenes, 150x150 JPEG
)


def _images(dirs: list[Path]) -> list[Path]:
    out = []
    for d in dirs:
        out += sorted(
            p for p in d.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")
        )
    if not out:
        raise SystemExit(f"no images under {[str(d) for d in dirs]}")
    return out


def build_shards(root_dir: Path, image_dirs: list[Path], samples: int, per_shard: int) -> list[str]:
    files = _images(image_dirs)
    rows = [
        {
            "uid": 0x5EED0000 + i,
            "source": "bench",
            "partition": "bench",
            "caption": f"an aerial photograph number {i}",
            "tar": None,
            "member": None,
            "path": str(files[i % len(files)]),
            "sha256": None,
            "info": json.dumps({"places": [], "scores": {}, "metadata": {}}),
        }
        for i in range(samples)
    ]
    root = DatasetRoot(root_dir)
    manifest = write_shards(
        root,
        {"pub11": pa.Table.from_pylist(rows, schema=SHARD_INPUT)},
        ShardConfig(samples_per_shard=per_shard, val_ratio=0.0),
        reshard=True,
    )
    return manifest.urls("pub11", "train")


def _rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB")


def _identity(x):
    return x


def reference_loader(urls: list[str], size: int, batch: int, workers: int, train: bool):
    if train:
        first = [
            T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)
        ]
    else:
        first = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    transform = T.Compose([*first, _rgb, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    ds = (
        wds.WebDataset(urls, shardshuffle=False)
        .decode("pil")
        .to_tuple("jpg;png;webp", "txt")
        .map_tuple(transform, _identity)
    )
    # persistent workers only so that their CPU time can be read after the pass
    return wds.WebLoader(ds, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)


def ours_loader(urls: list[str], size: int, batch: int, workers: int, train: bool, **kw):
    return make_loader(
        urls,
        batch_size=batch,
        workers=workers,
        shuffle_buffer=1000,
        image_size=size,
        augment=train,
        **kw,
    )


def ours_uint8_loader(urls: list[str], size: int, batch: int, workers: int, train: bool):
    """uint8 batches (4x fewer bytes between processes); normalise on the GPU."""
    return ours_loader(urls, size, batch, workers, train, normalize=False)


def _children() -> list[int]:
    """Pids of this process's children (the loader's workers), from /proc."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` since they started (Linux /proc; 0 elsewhere)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(loader) -> tuple[float, float, int]:
    """(images per wall second, images per CPU second, images) over one whole pass, worker
    start-up included (use enough samples to amortise it). CPU seconds are those of the main
    process plus the loader's own workers since they started, so the second number is what
    one fully busy worker delivers, whatever else runs on the machine."""
    before = set(_children())
    cpu0, start = time.process_time(), time.perf_counter()
    n, shape, pids = 0, None, []
    for images, _ in loader:
        if not pids:
            pids = sorted(set(_children()) - before)  # this loader's (persistent) workers
        n += images.shape[0]
        assert shape is None or images.shape[1:] == shape
        shape = images.shape[1:]
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0 + _cpu_seconds(pids)
    return n / elapsed, n / max(cpu, 1e-9), n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", nargs="*", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    image_dirs = args.images or [d for d in DEFAULT_IMAGE_DIRS if d.is_dir()]
    if not image_dirs:
        raise SystemExit(f"no --images given and no fixtures at {FIXTURES}")
    with tempfile.TemporaryDirectory(prefix="rs5m-bench-") as tmp:
        urls = build_shards(Path(tmp) / "root", image_dirs, args.samples, args.per_shard)
        files = _images(image_dirs)
        sizes = [Image.open(p).size for p in files[:200]]
        mean_px = statistics.mean(w * h for w, h in sizes)
        print(
            f"{len(urls)} shards, {args.samples} samples from {len(files)} images "
            f"({', '.join(str(d) for d in image_dirs)}), mean {mean_px / 1e3:.0f} kpx; "
            f"cpu count {os.cpu_count()}",
            flush=True,
        )
        configs = [
            ("reference", reference_loader, False),
            ("ours-eval", ours_loader, False),
            ("reference-train", reference_loader, True),
            ("ours-train", ours_loader, True),
            ("ours-train-uint8", ours_uint8_loader, True),
        ]
        results = []
        for workers in args.workers:
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in configs}
            for _ in range(args.repeats):
                for name, factory, train in configs:
                    loader = factory(urls, args.image_size, args.batch_size, workers, train)
                    wall, cpu, _ = measure(loader)
                    runs[name].append((wall, cpu))
                    del loader
                    gc.collect()
            for name, _, _ in configs:
                wall = statistics.median(r[0] for r in runs[name])
                cpu = statistics.median(r[1] for r in runs[name])
                results.append(
                    {
                        "loader": name,
                        "workers": workers,
                        "images_per_s": round(wall, 1),
                        "per_worker_wall": round(wall / max(1, workers), 1),
                        "per_cpu_second": round(cpu, 1),
                        "runs": [[round(w, 1), round(c, 1)] for w, c in runs[name]],
                    }
                )
            ref = {r["loader"]: r for r in results if r["workers"] == workers}
            for ours, base in (
                ("ours-eval", "reference"),
                ("ours-train", "reference-train"),
                ("ours-train-uint8", "reference-train"),
            ):
                for key in ("images_per_s", "per_cpu_second"):
                    ref[ours][f"speedup_{key}"] = round(ref[ours][key] / ref[base][key], 2)

    print(
        "\n| loader | workers | images/s (wall) | per worker (wall) | images per CPU-second "
        "| speed-up (wall) | speed-up (CPU) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['loader']} | {r['workers']} | {r['images_per_s']} | {r['per_worker_wall']} | "
            f"{r['per_cpu_second']} | {r.get('speedup_images_per_s', '')} | "
            f"{r.get('speedup_per_cpu_second', '')} |"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "webdataset": getattr(wds, "__version__", "?"),
                    "results": results,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
