"""Deduplication benchmarks (results in bench/README_dedup.md).

(a) pHash near-duplicate search: 1,000,000 random 64-bit hashes with planted near-duplicates;
    seconds to find all pairs within the radius with our exact multi-index hashing search, against
    FAISS's exhaustive binary range search and a BK-tree (imagededup's approach), both on a
    sample of queries in the same run (their full-run time is extrapolated), with a check that
    all three find the same pairs for the sampled queries.
(b) Embedding near-duplicate search: 200,000 x 512 normalised embeddings (clustered, with planted
    pairs); the IVF range search's recall of the exact search's pairs and its speed-up, on a
    sample of queries against the full set.
(c) pHash throughput: images per second on one core, plain imagehash against the draft-mode
    path, and how often their hashes agree.

Everything runs on one thread (``faiss.omp_set_num_threads(1)``) so the numbers are per core.

    python bench/dedup.py                 # everything (about 5-10 minutes on one core)
    python bench/dedup.py --only a --n 200000
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.dedup import (
    EmbeddingIndex,
    binary_codes,
    default_nlist,
    hamming_pairs,
    mih_plan,
    train_ivf_centroids,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


# ---------------------------------------------------------------------------------------------
# (a) pHash search
# ---------------------------------------------------------------------------------------------
class BKTree:
    """A Burkhard-Keller tree over Hamming distance, as imagededup builds it (pure Python)."""

    def __init__(self) -> None:
        self.root: list | None = None  # [hash, index, {distance: child}]

    def add(self, h: int, idx: int) -> None:
        if self.root is None:
            self.root = [h, idx, {}]
            return
        node = self.root
        while True:
            d = (node[0] ^ h).bit_count()
            child = node[2].get(d)
            if child is None:
                node[2][d] = [h, idx, {}]
                return
            node = child

    def query(self, h: int, radius: int) -> list[int]:
        out, stack = [], [self.root] if self.root else []
        while stack:
            node = stack.pop()
            d = (node[0] ^ h).bit_count()
            if d <= radius:
                out.append(node[1])
            for dist, child in node[2].items():
                if d - radius <= dist <= d + radius:
                    stack.append(child)
        return out


def planted_hashes(n: int, n_planted: int, radius: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    src = rng.integers(0, n, n_planted)
    dst = rng.integers(0, n, n_planted)
    for s, d in zip(src, dst, strict=True):
        x = int(h[s])
        for b in rng.choice(64, rng.integers(0, radius + 1), replace=False):
            x ^= 1 << int(b)
        h[d] = x
    return h


def bench_phash_search(n: int, radii: list[int], sample: int, bk_sample: int) -> list[dict]:
    rows = []
    for radius in radii:
        h = planted_hashes(n, n // 100, radius)
        t = time.perf_counter()
        i, j, _ = hamming_pairs(h, None, radius, method="mih")
        ours = time.perf_counter() - t
        m, f = mih_plan(radius, n)
        row = {
            "n": n,
            "radius": radius,
            "pairs": len(i),
            "ours_s": round(ours, 1),
            "ours_plan": f"{m} chunks, <= {f} flips",
        }
        # FAISS exhaustive binary range search: a sample of queries against all n.
        rng = np.random.default_rng(1)
        qs = np.sort(rng.choice(n, sample, replace=False))
        index = faiss.IndexBinaryFlat(64)
        index.add(binary_codes(h))
        t = time.perf_counter()
        lims, _, labels = index.range_search(binary_codes(h[qs]), radius + 1)
        flat = time.perf_counter() - t
        row["faiss_flat_s_per_1k_queries"] = round(flat / sample * 1000, 3)
        row["faiss_flat_s_extrapolated"] = round(flat / sample * n, 1)  # n queries
        flat_pairs = {
            (int(q), int(b))
            for k, q in enumerate(qs)
            for b in labels[lims[k] : lims[k + 1]]
            if b != q
        }
        ours_pairs = set()
        sel = set(qs.tolist())
        for a, b in zip(i.tolist(), j.tolist(), strict=True):
            if a in sel:
                ours_pairs.add((a, b))
            if b in sel:
                ours_pairs.add((b, a))
        row["same_pairs_as_faiss_on_sample"] = ours_pairs == flat_pairs
        if radius == radii[0] and bk_sample:
            # BK-tree: built over all n (timed), queried with a sample.
            tree = BKTree()
            hl = h.tolist()
            t = time.perf_counter()
            for k, x in enumerate(hl):
                tree.add(x, k)
            build = time.perf_counter() - t
            bq = qs[:bk_sample]
            t = time.perf_counter()
            bk_pairs = {(int(q), b) for q in bq for b in tree.query(hl[int(q)], radius) if b != q}
            bkq = time.perf_counter() - t
            row["bktree_build_s"] = round(build, 1)
            row["bktree_s_per_1k_queries"] = round(bkq / len(bq) * 1000, 2)
            row["bktree_s_extrapolated"] = round(build + bkq / len(bq) * n, 1)
            sub = {p for p in flat_pairs if p[0] in set(bq.tolist())}
            row["bktree_same_pairs"] = bk_pairs == sub
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# (b) embedding search
# ---------------------------------------------------------------------------------------------
def clustered_embeddings(n: int, d: int, n_planted: int, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors (CLIP-like: a neighbour at cosine ~0.7-0.85), plus planted
    near-duplicates with cosine 0.97-0.999 to their source."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 100, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, len(centres), n)]
    x += rng.normal(scale=0.65 / np.sqrt(d), size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.integers(0, n, n_planted)
    dst = rng.integers(0, n, n_planted)
    target = rng.uniform(0.97, 0.999, n_planted)
    noise = rng.normal(size=(n_planted, d)).astype(np.float32)
    noise -= np.sum(noise * x[src], axis=1, keepdims=True) * x[src]  # orthogonal to source
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x[dst] = x[src] * target[:, None] + noise * np.sqrt(1 - target**2)[:, None]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def bench_embedding_search(
    n: int, d: int, threshold: float, sample: int, nprobes: list[int], nlist: int | None
) -> list[dict]:
    x = clustered_embeddings(n, d, n // 40)
    rng = np.random.default_rng(2)
    qs = np.sort(rng.choice(n, sample, replace=False))
    exact = EmbeddingIndex(d)
    exact.add(x)
    t = time.perf_counter()
    i, j, _ = exact.range_pairs(x[qs], threshold)
    t_exact = time.perf_counter() - t
    truth = {(int(qs[a]), int(b)) for a, b in zip(i, j, strict=True) if qs[a] != b}
    nlist = nlist or default_nlist(n)
    t = time.perf_counter()
    centroids = train_ivf_centroids(x, nlist)
    t_train = time.perf_counter() - t
    rows = []
    for nprobe in nprobes:
        ivf = EmbeddingIndex(d, centroids, nprobe)
        t = time.perf_counter()
        ivf.add(x)
        t_add = time.perf_counter() - t
        t = time.perf_counter()
        i, j, _ = ivf.range_pairs(x[qs], threshold)
        t_ivf = time.perf_counter() - t
        found = {(int(qs[a]), int(b)) for a, b in zip(i, j, strict=True) if qs[a] != b}
        row = {
            "n": n,
            "d": d,
            "threshold": threshold,
            "queries": sample,
            "exact_pairs": len(truth),
            "nlist": nlist,
            "nprobe": nprobe,
            "recall": round(len(found & truth) / max(1, len(truth)), 4),
            "false_pairs": len(found - truth),
            "exact_s_per_1k_queries": round(t_exact / sample * 1000, 3),
            "ivf_s_per_1k_queries": round(t_ivf / sample * 1000, 4),
            "speedup": round(t_exact / t_ivf, 1),
            "ivf_train_s": round(t_train, 1),
            "ivf_add_s": round(t_add, 1),
            "exact_all_n_s_extrapolated": round(t_exact / sample * n, 1),
            "ivf_all_n_s_extrapolated": round(t_ivf / sample * n + t_train + t_add, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# (c) pHash throughput and agreement
# ---------------------------------------------------------------------------------------------
def _jpeg(image, quality=90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def image_sets(limit: int) -> dict[str, list[bytes]]:
    from PIL import Image

    sets: dict[str, list[bytes]] = {}
    euro = sorted(glob.glob(str(FIXTURES / "eurosat_rgb" / "*" / "*.jpg")))[:limit]
    aid = sorted(glob.glob(str(FIXTURES / "aid_150px" / "*" / "*.jpg")))[:limit]
    imnet = sorted(glob.glob(str(FIXTURES / "natural_photos" / "imagenet" / "*.JPEG")))[:limit]
    sets["eurosat 64px"] = [Path(p).read_bytes() for p in euro]
    sets["aid 150px"] = [Path(p).read_bytes() for p in aid]
    sets["imagenet ~500px"] = [Path(p).read_bytes() for p in imnet]
    big = []
    for data in sets["imagenet ~500px"][:100]:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        scale = 1024 / max(im.size)
        big.append(_jpeg(im.resize((round(im.width * scale), round(im.height * scale)))))
    sets["imagenet upscaled 1024px"] = big
    return sets


def bench_phash_speed(limit: int, draft_sizes: list[int]) -> list[dict]:
    from tasks.phash import phash_bytes

    rows = []
    for name, datas in image_sets(limit).items():
        if not datas:
            continue
        for d in datas[:20]:  # warm up (imports, caches)
            phash_bytes(d, "imagehash")
            phash_bytes(d, "fast")
        t = time.perf_counter()
        ref = [phash_bytes(d, "imagehash") for d in datas]
        plain = len(datas) / (time.perf_counter() - t)
        for size in draft_sizes:
            t = time.perf_counter()
            got = [phash_bytes(d, "fast", size) for d in datas]
            fast = len(datas) / (time.perf_counter() - t)
            dist = np.array([(a ^ b).bit_count() for a, b in zip(ref, got, strict=True)])
            row = {
                "images": name,
                "n": len(datas),
                "draft_size": size,
                "imagehash_per_s": round(plain),
                "fast_per_s": round(fast),
                "speedup": round(fast / plain, 2),
                "identical": round(float(np.mean(dist == 0)), 3),
                "within_2_bits": round(float(np.mean(dist <= 2)), 3),
                "mean_bits": round(float(dist.mean()), 3),
                "max_bits": int(dist.max()),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["a", "b", "c"], action="append")
    ap.add_argument("--n", type=int, default=1_000_000, help="(a) number of hashes")
    ap.add_argument("--radii", default="8,6,10", help="(a) Hamming radii, the first gets BK")
    ap.add_argument("--sample", type=int, default=20_000, help="(a) FAISS flat query sample")
    ap.add_argument("--bk-sample", type=int, default=100, help="(a) BK-tree query sample")
    ap.add_argument("--emb-n", type=int, default=200_000)
    ap.add_argument("--emb-d", type=int, default=512)
    ap.add_argument("--emb-sample", type=int, default=10_000)
    ap.add_argument("--threshold", type=float, default=0.97)
    ap.add_argument("--nprobe", default="8,16,32")
    ap.add_argument("--nlist", type=int, default=None)
    ap.add_argument("--images", type=int, default=400, help="(c) images per set")
    ap.add_argument("--draft-sizes", default="64,128,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    parts = set(args.only or ["a", "b", "c"])
    results: dict[str, list[dict]] = {}
    if "a" in parts:
        radii = [int(r) for r in args.radii.split(",")]
        results["a"] = bench_phash_search(args.n, radii, args.sample, args.bk_sample)
    if "b" in parts:
        nprobes = [int(p) for p in args.nprobe.split(",")]
        results["b"] = bench_embedding_search(
            args.emb_n, args.emb_d, args.threshold, args.emb_sample, nprobes, args.nlist
        )
    if "c" in parts:
        sizes = [int(s) for s in args.draft_sizes.split(",")]
        results["c"] = bench_phash_speed(args.images, sizes)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
