"""Near-duplicate removal across all sources and builds: pHash (Hamming radius) and CLIP image
embeddings (cosine threshold), incremental against a persistent index of kept samples.

Search (never an N x N matrix; memory grows with N plus the number of pairs found):

- pHash: :func:`hamming_pairs`. Small problems use FAISS's exhaustive binary range search
  (``IndexBinaryFlat``); large ones an exact multi-index hashing search (the 64 bits split into
  ``m`` chunks; by pigeonhole two hashes within radius ``r < m (f + 1)`` agree on some chunk up to
  ``f`` flipped bits, so probing every chunk value within ``f`` bits of a query's chunk in
  dense bucket tables finds every pair; candidates are then checked on all 64 bits).
- Embeddings: :func:`embedding_pairs`, inner-product range search on L2-normalised vectors,
  exact (``IndexFlatIP``) up to ``ivf_min_size`` indexed vectors, ``IndexIVFFlat`` above it.

Grouping: pairs are the edges of a graph whose connected components (union-find) are the
duplicate groups. In a group, samples already in the index (kept by earlier partitions) always
win: new members are removed as duplicates of their best directly matching indexed sample (or
of the group's best-linked indexed sample when they only match through others). A group of new
samples only keeps one survivor by this rule: **largest pixel area (width x height), then
longest caption, then smallest uid**. Every removed sample names ``duplicate_of`` (a kept
sample) and the distance to it: Hamming bits for ``duplicate_phash``, ``1 - cosine`` for
``duplicate_embedding``; the reason is the method under whose threshold that pair falls (pHash
first), else, for members joined only transitively, the method of their own best link
(``transitive: true`` and ``via`` in the ledger detail).

Incremental index (``index/dedup/<version>/`` in the dataset root; ``<version>`` hashes the dedup
parameters, the backbone and the pHash method, so changing any of them starts a new index):

- ``manifest.json``: the partitions the index holds, each with its sequence number, the digests
  of the inputs it was deduplicated from and its part file; written last (the commit point).
- ``parts/<seq>.parquet``: the survivors of one partition (uid, phash, image_embedding).
- ``ivf_centroids.npy``: the IVF coarse centroids, trained once when the index first exceeds
  ``ivf_min_size`` and reused, so the IVF partitioning does not drift between runs.

The flow runs dedup partitions one at a time in sorted partition-id order, across sources. A
partition is deduplicated within itself and against everything in the index, then its survivors
are added. Rerunning a partition the index already holds with the same input digests (a run
killed between the index update and the marker) recomputes against the index as it was before
that partition (sequence numbers) and adds nothing: same decisions, no duplicate entries, no
self-matches. A partition whose inputs changed has its old entries replaced.

Fingerprints: a partition's decisions depend on the index state before it, which is deliberately
not part of its fingerprint: decisions, once committed, are stable (later partitions never
reopen them), and the index records which partitions it held when (sequence numbers), so a redo
reproduces the same state. What does enter the fingerprint: the dedup parameters (which also
version the index) and the partition's own inputs. Deleting ``index/dedup/`` without deleting
the dedup markers would let later partitions miss the old survivors: delete both together.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from schemas.dedup_config import DedupConfig
from schemas.embeddings import float16_lists, lists_to_matrix
from schemas.tables import DECISIONS, DEDUP, FEATURES, KEYWORD_FILTER, VALIDATE
from storage.root import DatasetRoot
from storage.stage import Stage, StageContext, StageResult, dumps_detail

INDEX_DIR = "index/dedup"
REASON_PHASH = "duplicate_phash"
REASON_EMBEDDING = "duplicate_embedding"
_PHASH, _EMB = 0, 1  # method ranks: pHash links are preferred
_FLAT_BINARY_MAX_WORK = 4e8  # query x base comparisons below which FAISS's flat search is used


# --------------------------------------------------------------------------------------------
# pHash search
# --------------------------------------------------------------------------------------------
def binary_codes(hashes: np.ndarray) -> np.ndarray:
    """uint64 hashes as ``(n, 8)`` uint8 codes for a FAISS binary index (native byte order:
    Hamming distances do not depend on it; ``tasks.phash.hashes_to_codes`` is big-endian)."""
    return np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64)).view(np.uint8).reshape(-1, 8)


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def _pairs_flat_binary(
    q: np.ndarray, base: np.ndarray | None, radius: int, batch: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray]:
    self_mode = base is None
    b = q if self_mode else base
    index = faiss.IndexBinaryFlat(64)
    index.add(binary_codes(b))
    codes = binary_codes(q)
    out_i, out_j = [], []
    for start in range(0, len(q), batch):
        lims, _, labels = index.range_search(codes[start : start + batch], radius + 1)
        qi = np.repeat(
            np.arange(start, start + len(lims) - 1, dtype=np.int64), np.diff(lims).astype(np.int64)
        )
        bj = labels.astype(np.int64)
        if self_mode:
            keep = qi < bj
            qi, bj = qi[keep], bj[keep]
        out_i.append(qi)
        out_j.append(bj)
    return _cat(out_i), _cat(out_j)


def _chunk_layout(m: int) -> list[tuple[int, int]]:
    """(shift, bits) of ``m`` contiguous chunks covering the 64 bits."""
    sizes = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
    layout, shift = [], 0
    for size in sizes:
        layout.append((shift, size))
        shift += size
    return layout


def mih_plan(radius: int, n_base: int) -> tuple[int, int]:
    """(chunks m, flips f) with ``m (f + 1) > radius`` that minimise the estimated work."""
    best = None
    for m in range(3, 17):
        bits = 64 // m + (1 if 64 % m else 0)
        if bits > 22:
            continue
        f = max(0, math.ceil((radius + 1) / m) - 1)
        probes = m * sum(math.comb(bits, k) for k in range(f + 1))
        candidates = probes * n_base / 2 ** (64 // m)
        cost = probes + 0.5 * candidates
        if best is None or cost < best[0]:
            best = (cost, m, f)
    assert best is not None
    return best[1], best[2]


def _flip_masks(bits: int, f: int) -> list[int]:
    masks = [0]
    for k in range(1, f + 1):
        for combo in itertools.combinations(range(bits), k):
            masks.append(sum(1 << c for c in combo))
    return masks


def _pairs_mih(
    q: np.ndarray, base: np.ndarray | None, radius: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact multi-index hashing range search (see the module docstring).

    Per chunk table the base is sorted by chunk value (dense bucket counts and starts), and the
    queries are visited in sorted chunk order too, so that looking up ``chunk ^ mask`` walks the
    bucket table almost sequentially (cache friendly).
    """
    self_mode = base is None
    b = q if self_mode else base
    m, f = mih_plan(radius, len(b))
    layout = _chunk_layout(m)
    r = np.uint64(radius)
    out_i, out_j = [], []
    for t, (shift, bits) in enumerate(layout):
        chunk_mask = np.uint64((1 << bits) - 1)
        cb = ((b >> np.uint64(shift)) & chunk_mask).astype(np.int32)
        order = np.argsort(cb, kind="stable")
        cbs = cb[order]
        hbs = b[order]
        counts = np.bincount(cbs, minlength=1 << bits).astype(np.int32)
        starts = np.zeros(1 << bits, np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        if self_mode:
            qorder, cqs, hqs = order, cbs, hbs
        else:
            cq = ((q >> np.uint64(shift)) & chunk_mask).astype(np.int32)
            qorder = np.argsort(cq, kind="stable")
            cqs, hqs = cq[qorder], q[qorder]
        for mask in _flip_masks(bits, f):
            keys = cqs ^ np.int32(mask)
            cnt = counts[keys]
            if self_mode and mask:
                cnt = np.where(cqs < keys, cnt, 0)  # each unordered pair once
            hit = np.flatnonzero(cnt)
            if hit.size == 0:
                continue
            c = cnt[hit].astype(np.int64)
            total = int(c.sum())
            qpos = np.repeat(hit, c)
            bpos = np.repeat(starts[keys[hit]] - (np.cumsum(c) - c), c) + np.arange(total)
            if self_mode and not mask:
                keep = qpos < bpos
                qpos, bpos = qpos[keep], bpos[keep]
            x = hqs[qpos] ^ hbs[bpos]
            keep = _popcount(x) <= r
            # A pair is reported by the first chunk (table) within f bits only.
            for shift2, bits2 in layout[:t]:
                part = (x >> np.uint64(shift2)) & np.uint64((1 << bits2) - 1)
                keep &= _popcount(part) > f
            qi, bj = qorder[qpos[keep]], order[bpos[keep]]
            if self_mode:
                qi, bj = np.minimum(qi, bj), np.maximum(qi, bj)
            out_i.append(qi.astype(np.int64))
            out_j.append(bj.astype(np.int64))
    return _cat(out_i), _cat(out_j)


def hamming_pairs(
    query: np.ndarray,
    base: np.ndarray | None = None,
    radius: int = 8,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs within ``radius`` bits: ``(i, j, distance)``, sorted.

    ``base=None``: pairs inside ``query`` with ``i < j``. Otherwise ``i`` indexes ``query`` and
    ``j`` indexes ``base``. ``method``: ``"flat"`` (FAISS exhaustive), ``"mih"``, or ``"auto"``.
    """
    q = np.ascontiguousarray(np.asarray(query, dtype=np.uint64))
    b = None if base is None else np.ascontiguousarray(np.asarray(base, dtype=np.uint64))
    nb = len(q) if b is None else len(b)
    if len(q) == 0 or nb == 0:
        return _empty_pairs(np.int8)
    if method == "auto":
        method = "flat" if len(q) * nb <= _FLAT_BINARY_MAX_WORK else "mih"
    if method == "flat":
        i, j = _pairs_flat_binary(q, b, radius)
    elif method == "mih":
        i, j = _pairs_mih(q, b, radius)
    else:
        raise ValueError(f"unknown method {method!r}")
    d = _popcount(q[i] ^ (q if b is None else b)[j]).astype(np.int8)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


# --------------------------------------------------------------------------------------------
# embedding search
# --------------------------------------------------------------------------------------------
def default_nlist(n: int) -> int:
    return int(max(1, min(int(4 * math.sqrt(n)), n // 39)))


def train_ivf_centroids(x: np.ndarray, nlist: int, seed: int = 1234) -> np.ndarray:
    """k-means centroids (inner product) for an IVF index, trained on a fixed sample of ``x``."""
    n, d = x.shape
    sample = x[:: max(1, n // (64 * nlist))] if n > 64 * nlist else x
    km = faiss.Kmeans(d, nlist, niter=20, seed=seed, spherical=True, verbose=False)
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


class EmbeddingIndex:
    """An inner-product index over normalised vectors: exact, or IVF with given centroids."""

    def __init__(self, d: int, centroids: np.ndarray | None = None, nprobe: int = 8):
        self.d = d
        self.centroids = centroids
        if centroids is None:
            self.index: faiss.Index = faiss.IndexFlatIP(d)
        else:
            quantizer = faiss.IndexFlatIP(d)
            quantizer.add(centroids)
            ivf = faiss.IndexIVFFlat(quantizer, d, len(centroids), faiss.METRIC_INNER_PRODUCT)
            ivf.is_trained = True
            ivf.nprobe = min(nprobe, len(centroids))
            self._quantizer = quantizer  # keep it alive
            self.index = ivf

    @property
    def kind(self) -> str:
        return "exact" if self.centroids is None else "ivf"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, x: np.ndarray) -> None:
        if len(x):
            self.index.add(np.ascontiguousarray(x, dtype=np.float32))

    def range_pairs(
        self, q: np.ndarray, threshold: float, batch: int = 4096
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, similarity) for similarity >= threshold, i into ``q``, j into the index."""
        out_i, out_j, out_s = [], [], []
        q = np.ascontiguousarray(q, dtype=np.float32)
        radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
        for start in range(0, len(q), batch):
            lims, sims, labels = self.index.range_search(q[start : start + batch], radius)
            qi = np.repeat(
                np.arange(start, start + len(lims) - 1, dtype=np.int64),
                np.diff(lims).astype(np.int64),
            )
            keep = sims >= np.float32(threshold)
            out_i.append(qi[keep])
            out_j.append(labels[keep].astype(np.int64))
            out_s.append(sims[keep].astype(np.float32))
        return _cat(out_i), _cat(out_j), _cat(out_s, np.float32)


def embedding_pairs(
    query: np.ndarray,
    base: np.ndarray | None = None,
    threshold: float = 0.97,
    ivf_min_size: int = 100_000,
    nlist: int | None = None,
    nprobe: int = 8,
    centroids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of normalised vectors with cosine similarity >= ``threshold``: ``(i, j, sim)``.

    ``base=None``: pairs inside ``query`` with ``i < j``. Exact search while the searched set has
    fewer than ``ivf_min_size`` vectors; IVF above (``centroids`` given, or trained here).
    """
    q = np.ascontiguousarray(query, dtype=np.float32)
    b = q if base is None else np.ascontiguousarray(base, dtype=np.float32)
    if len(q) == 0 or len(b) == 0:
        return _empty_pairs(np.float32)
    if len(b) >= ivf_min_size and centroids is None:
        centroids = train_ivf_centroids(b, nlist or default_nlist(len(b)))
    index = EmbeddingIndex(b.shape[1], centroids if len(b) >= ivf_min_size else None, nprobe)
    index.add(b)
    i, j, s = index.range_pairs(q, threshold)
    if base is None:
        keep = i < j
        i, j, s = i[keep], j[keep], s[keep]
        if index.kind == "ivf":  # an approximate search may find (j, i) but not (i, j)
            i, j, s = _unique_pairs(np.minimum(i, j), np.maximum(i, j), s)
    order = np.lexsort((j, i))
    return i[order], j[order], s[order]


def _unique_pairs(i, j, s):
    key = i.astype(np.int64) * (int(j.max(initial=0)) + 1) + j
    _, first = np.unique(key, return_index=True)
    return i[first], j[first], s[first]


# --------------------------------------------------------------------------------------------
# grouping and survivors
# --------------------------------------------------------------------------------------------
@dataclass
class Items:
    """Samples with their features (new ones carry area and caption length for the rule)."""

    uid: np.ndarray  # uint64
    phash: np.ndarray  # uint64
    emb: np.ndarray  # (n, d) float32, L2-normalised (d may be 0 when embeddings are unused)
    area: np.ndarray | None = None  # int64
    caption_len: np.ndarray | None = None  # int64
    search: EmbeddingIndex | None = None  # a prebuilt index over ``emb`` (persistent index)

    def __len__(self) -> int:
        return len(self.uid)

    @staticmethod
    def empty(d: int = 0) -> Items:
        return Items(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros((0, d), np.float32))


@dataclass
class Decisions:
    keep: np.ndarray
    reason: list[str | None]
    duplicate_of: np.ndarray  # uint64, 0 where kept
    distance: np.ndarray  # float32, nan where kept
    detail: list[str | None]
    counts: dict[str, int]


def survivor_order(area: np.ndarray, caption_len: np.ndarray, uid: np.ndarray) -> np.ndarray:
    """Indices sorted best first: largest area, then longest caption, then smallest uid."""
    return np.lexsort((uid, -caption_len, -area))


def decide(new: Items, index: Items | None, cfg: DedupConfig) -> Decisions:
    """Dedup ``new`` within itself and against ``index`` (whose members always survive)."""
    index = index if index is not None else Items.empty(new.emb.shape[1] if new.emb.ndim else 0)
    n, m = len(new), len(index)
    edges: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []  # (a, b, dist, method)
    # Identical keys are collapsed first (one representative each, the others linked to it at
    # distance 0), so a thousand copies of one blank image cost a thousand edges, not a million.
    rep_of: dict[int, np.ndarray] = {}
    if cfg.use_phash:
        first, inv = _collapse(new.phash)
        rep_of[_PHASH] = first[inv]
        edges.append(_star(first, inv, _PHASH))
        i, j, d = hamming_pairs(new.phash[first], None, cfg.phash_radius)
        edges.append((first[i], first[j], d.astype(np.float32), _PHASH))
        if m:
            i, j, d = hamming_pairs(new.phash[first], index.phash, cfg.phash_radius)
            edges.append((first[i], j + n, d.astype(np.float32), _PHASH))
    if cfg.use_embedding:
        kw = {
            "threshold": cfg.embedding_threshold,
            "ivf_min_size": cfg.ivf_min_size,
            "nlist": cfg.nlist,
            "nprobe": cfg.nprobe,
        }
        first, inv = _collapse(new.emb)
        rep_of[_EMB] = first[inv]
        edges.append(_star(first, inv, _EMB))
        uemb = new.emb[first]
        i, j, s = embedding_pairs(uemb, None, **kw)
        edges.append((first[i], first[j], 1.0 - s, _EMB))
        if m:
            if index.search is not None:
                i, j, s = index.search.range_pairs(uemb, cfg.embedding_threshold)
            else:
                i, j, s = embedding_pairs(uemb, index.emb, **kw)
            edges.append((first[i], j + n, 1.0 - s, _EMB))
    a = _cat([e[0] for e in edges])
    b = _cat([e[1] for e in edges])
    dist = _cat([e[2] for e in edges], np.float32)
    meth = _cat([np.full(len(e[0]), e[3], np.int8) for e in edges], np.int8)

    keep = np.ones(n, bool)
    reason: list[str | None] = [None] * n
    dup_of = np.zeros(n, np.uint64)
    distance = np.full(n, np.nan, np.float32)
    detail: list[str | None] = [None] * n
    counts = {REASON_PHASH: 0, REASON_EMBEDDING: 0, "pairs": len(a), "index_size": m}
    if len(a) == 0:
        return Decisions(keep, reason, dup_of, distance, detail, counts)

    all_uid = np.concatenate([new.uid, index.uid])
    # Each node's best direct link (pHash first, then smaller distance, then smaller uid).
    src = np.concatenate([a, b])
    dst = np.concatenate([b, a])
    d2 = np.concatenate([dist, dist])
    m2 = np.concatenate([meth, meth])
    order = np.lexsort((all_uid[dst], d2, m2, src))
    first = order[np.r_[True, src[order][1:] != src[order][:-1]]]
    best_link = {int(src[k]): (int(dst[k]), float(d2[k]), int(m2[k])) for k in first}
    # Best direct link of each new node to an indexed node.
    to_index = (src < n) & (dst >= n)
    oi = order[to_index[order]]
    fi = oi[np.r_[True, src[oi][1:] != src[oi][:-1]]] if len(oi) else oi
    best_index_link = {int(src[k]): int(dst[k]) for k in fi}

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n + m, n + m))
    _, label = connected_components(graph, directed=False)
    touched = np.unique(np.concatenate([a, b]))
    groups: dict[int, list[int]] = {}
    for node in touched.tolist():
        groups.setdefault(int(label[node]), []).append(node)

    area = new.area if new.area is not None else np.zeros(n, np.int64)
    caplen = new.caption_len if new.caption_len is not None else np.zeros(n, np.int64)
    for members in groups.values():
        fresh = np.array([x for x in members if x < n], np.int64)
        indexed = [x for x in members if x >= n]
        if indexed:
            # The indexed member with the strongest link anchors members with no direct link.
            anchor = min(indexed, key=lambda x: (best_link[x][2], best_link[x][1], all_uid[x]))
            targets = {
                int(x): _index_target(int(x), best_index_link, rep_of, anchor) for x in fresh
            }
        else:
            ranked = fresh[survivor_order(area[fresh], caplen[fresh], new.uid[fresh])]
            survivor = int(ranked[0])
            targets = {int(x): survivor for x in ranked[1:]}
        for x, t in targets.items():
            keep[x] = False
            _removed(new, index, cfg, x, t, best_link[x], all_uid, reason, dup_of, distance, detail)
            counts[reason[x]] += 1
    return Decisions(keep, reason, dup_of, distance, detail, counts)


def _collapse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first index of each distinct key or row, inverse mapping)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if keys.ndim == 2:
        rows = np.ascontiguousarray(keys)
        keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).reshape(-1)
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    return first.astype(np.int64), inv.reshape(-1).astype(np.int64)


def _star(first: np.ndarray, inv: np.ndarray, method: int):
    rep = first[inv]
    x = np.flatnonzero(rep != np.arange(len(inv)))
    return rep[x], x, np.zeros(len(x), np.float32), method


def _index_target(x: int, best_index_link: dict, rep_of: dict, anchor: int) -> int:
    """A new sample's indexed target: its own best link, else that of an identical sample."""
    if x in best_index_link:
        return best_index_link[x]
    for reps in rep_of.values():
        if int(reps[x]) in best_index_link:
            return best_index_link[int(reps[x])]
    return anchor


def _removed(new, index, cfg, x, t, link, all_uid, reason, dup_of, distance, detail) -> None:
    n = len(new)
    th = index.phash[t - n] if t >= n else new.phash[t]
    ham = int(new.phash[x] ^ th).bit_count()
    cos = None
    if cfg.use_embedding:
        te = index.emb[t - n] if t >= n else new.emb[t]
        cos = float(np.dot(new.emb[x], te))
    extra: dict[str, Any] = {}
    if cfg.use_phash and ham <= cfg.phash_radius:
        method, dist = REASON_PHASH, float(ham)
    elif cos is not None and cos >= cfg.embedding_threshold:
        method, dist = REASON_EMBEDDING, 1.0 - cos
    else:  # joined through other members only
        via, via_dist, via_method = link
        method = REASON_PHASH if via_method == _PHASH else REASON_EMBEDDING
        dist = float(ham) if method == REASON_PHASH else 1.0 - float(cos)
        extra = {"transitive": True, "via": int(all_uid[via]), "via_distance": round(via_dist, 6)}
    reason[x] = method
    dup_of[x] = all_uid[t]
    distance[x] = dist
    detail[x] = dumps_detail(
        duplicate_of=int(all_uid[t]),
        distance=round(dist, 6),
        method="phash" if method == REASON_PHASH else "embedding",
        phash_distance=ham,
        cosine=None if cos is None else round(cos, 6),
        in_index=bool(t >= n),
        **extra,
    )


# --------------------------------------------------------------------------------------------
# persistent index of kept samples
# --------------------------------------------------------------------------------------------
_INDEX_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.uint64()),
        pa.field("phash", pa.uint64()),
        pa.field("image_embedding", pa.list_(pa.float16())),
    ]
)
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()
# Loaded indexes, per process (a flow may create a new stage object per partition): each
# partition then reads only the part files added since the previous one.
_INDEXES: dict[tuple[str, str], DedupIndex] = {}
_MAX_CACHED_INDEXES = 4


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


class DedupIndex:
    """The kept samples of every deduplicated partition, in the root at ``index/dedup/<version>``.

    Part files are cached in memory between partitions of one process, so each partition reads
    only what was added since.
    """

    def __init__(self, root: DatasetRoot, version: str, params: dict[str, Any]):
        self.root = root
        self.version = version
        self.params = params
        self.dir = root.join(INDEX_DIR, version)
        self._parts: dict[tuple[int, str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._centroids: np.ndarray | None = None
        self._search: tuple[list[tuple[int, str, str]], EmbeddingIndex] | None = None

    # -- manifest ------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        data = self.root.read_json(posixpath_join(self.dir, "manifest.json"))
        if data is None:
            data = {"version": self.version, "params": self.params, "partitions": {}}
        return data

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        self.root.write_json(posixpath_join(self.dir, "manifest.json"), manifest)

    @staticmethod
    def _entry_key(pid: str, entry: dict[str, Any]) -> tuple[int, str, str]:
        return (int(entry["seq"]), pid, entry.get("token") or _digest(entry["inputs"]))

    def _load_part(self, pid: str, entry: dict[str, Any]):
        key = self._entry_key(pid, entry)
        if key not in self._parts:
            table = self.root.read_table(posixpath_join(self.dir, entry["file"]))
            emb = lists_to_matrix(table.column("image_embedding"), np.float16)
            self._parts[key] = (
                table.column("uid").to_numpy().astype(np.uint64),
                table.column("phash").to_numpy().astype(np.uint64),
                emb,
            )
        return self._parts[key]

    def centroids(self, manifest: dict[str, Any]) -> np.ndarray | None:
        info = manifest.get("ivf")
        if not info:
            return None
        if self._centroids is None or len(self._centroids) != info["nlist"]:
            with self.root.fs.open(posixpath_join(self.dir, info["file"]), "rb") as f:
                self._centroids = np.load(io.BytesIO(f.read()))
        return self._centroids

    def view(self, manifest: dict[str, Any], exclude: str | None = None, before_seq=None) -> Items:
        """The indexed samples (all, or those added before ``before_seq``), in seq order."""
        entries = sorted(manifest["partitions"].items(), key=lambda kv: kv[1]["seq"])
        uids, hashes, embs, keys = [], [], [], []
        for pid, entry in entries:
            if pid == exclude or (before_seq is not None and entry["seq"] >= before_seq):
                continue
            u, h, e = self._load_part(pid, entry)
            uids.append(u)
            hashes.append(h)
            embs.append(e)
            keys.append(self._entry_key(pid, entry))
        d = next((e.shape[1] for e in embs if e.ndim == 2 and e.shape[1]), 0)
        items = Items(
            _cat(uids, np.uint64),
            _cat(hashes, np.uint64),
            _normalise(np.concatenate(embs) if embs else np.zeros((0, d), np.float16)),
        )
        items.keys = keys  # type: ignore[attr-defined]
        return items

    def attach_search(self, items: Items, manifest: dict[str, Any], cfg: DedupConfig) -> None:
        """Give ``items`` (a view) an embedding index, extending the cached one when the view
        only adds partitions to it (the usual case), so each partition costs O(new rows)."""
        if not cfg.use_embedding or len(items) == 0:
            return
        centroids = self.ensure_centroids(manifest, items, cfg)
        keys: list = items.keys  # type: ignore[attr-defined]
        cached = self._search
        if (
            cached is not None
            and cached[0] == keys[: len(cached[0])]
            and (cached[1].centroids is None) == (centroids is None)
        ):
            search = cached[1]
            search.add(items.emb[search.ntotal :])
        else:
            search = EmbeddingIndex(items.emb.shape[1], centroids, cfg.nprobe)
            search.add(items.emb)
        self._search = (list(keys), search)
        items.search = search

    def add(
        self, manifest: dict[str, Any], pid: str, inputs: dict[str, str], kept: Items
    ) -> dict[str, Any]:
        """Add one partition's survivors; the manifest is written last (the commit point)."""
        old = manifest["partitions"].pop(pid, None)
        seq = 1 + max((e["seq"] for e in manifest["partitions"].values()), default=-1)
        if old is not None:
            seq = max(seq, int(old["seq"]) + 1)
        file = f"parts/{seq:08d}.parquet"
        emb16 = np.asarray(kept.emb, np.float16)
        table = pa.table(
            {
                "uid": pa.array(kept.uid, pa.uint64()),
                "phash": pa.array(kept.phash, pa.uint64()),
                "image_embedding": float16_lists(emb16),
            },
            schema=_INDEX_SCHEMA,
        )
        self.root.write_table(posixpath_join(self.dir, file), table)
        # ``token`` tells this addition apart from any other one with the same seq (a rebuilt
        # index), so in-memory caches never serve stale part files.
        entry = {
            "seq": seq,
            "inputs": inputs,
            "rows": len(kept),
            "file": file,
            "token": uuid.uuid4().hex,
        }
        manifest["partitions"][pid] = entry
        manifest["size"] = sum(e["rows"] for e in manifest["partitions"].values())
        self._write_manifest(manifest)
        self._parts[self._entry_key(pid, entry)] = (kept.uid, kept.phash, emb16)
        if old is not None and old["file"] != file:
            self.root.remove(posixpath_join(self.dir, old["file"]))
        return manifest

    def ensure_centroids(self, manifest: dict[str, Any], items: Items, cfg: DedupConfig):
        """Train and persist the IVF centroids the first time the index reaches the IVF size."""
        if len(items) < cfg.ivf_min_size or not cfg.use_embedding:
            return None
        existing = self.centroids(manifest)
        if existing is not None:
            return existing
        nlist = cfg.nlist or default_nlist(len(items))
        centroids = train_ivf_centroids(items.emb, nlist)
        buf = io.BytesIO()
        np.save(buf, centroids)
        self.root.write_bytes(posixpath_join(self.dir, "ivf_centroids.npy"), buf.getvalue())
        manifest["ivf"] = {"file": "ivf_centroids.npy", "nlist": nlist, "trained_on": len(items)}
        self._write_manifest(manifest)
        self._centroids = centroids
        return centroids


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
class DedupStage(Stage):
    """Near-duplicate removal, within the partition and against the index of kept samples.

    Run partitions one at a time in sorted partition-id order (the flow does): each one reads
    and extends the shared index.
    """

    name = DEDUP
    version = "1"
    inputs = (FEATURES, VALIDATE, KEYWORD_FILTER)

    def __init__(self, settings: DedupConfig | None = None):
        self.settings = settings or DedupConfig()

    def params(self) -> dict[str, Any]:
        return self.settings.model_dump(mode="json")

    def index_version(self, features_params: dict[str, Any]) -> str:
        return _digest({"dedup": self.params(), "features": features_params})[:16]

    def index_for(self, root: DatasetRoot, features_params: dict[str, Any]) -> DedupIndex:
        version = self.index_version(features_params)
        key = (root.url, version)
        with _locks_guard:
            if key not in _INDEXES:
                while len(_INDEXES) >= _MAX_CACHED_INDEXES:
                    _INDEXES.pop(next(iter(_INDEXES)))
                _INDEXES[key] = DedupIndex(
                    root, version, {"dedup": self.params(), "features": features_params}
                )
            return _INDEXES[key]

    def run(self, ctx: StageContext) -> StageResult:
        root, part = ctx.root, ctx.partition
        markers = {
            up: root.read_json(root.marker_path(up, part.source, part.name)) or {}
            for up in self.inputs
        }
        inputs = {up: markers[up].get("output_digest") for up in self.inputs}
        index = self.index_for(root, markers[FEATURES].get("params", {}))
        new = load_items(ctx, self.settings)
        with _lock_for(index.dir):
            manifest = index.manifest()
            entry = manifest["partitions"].get(part.id)
            redo = entry is not None and entry["inputs"] == inputs
            if redo:
                view = index.view(manifest, before_seq=entry["seq"])
            else:
                view = index.view(manifest, exclude=part.id)
            index.attach_search(view, manifest, self.settings)
            dec = decide(new, view, self.settings)
            if not redo:
                kept = Items(new.uid[dec.keep], new.phash[dec.keep], new.emb[dec.keep])
                index.add(manifest, part.id, inputs, kept)
        return build_result(new, dec, redo)


def load_items(ctx: StageContext, cfg: DedupConfig) -> Items:
    feats = ctx.read_input(FEATURES)
    uid = feats.column("uid").to_numpy().astype(np.uint64)
    phash = feats.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64)
    if cfg.use_embedding:
        emb = _normalise(lists_to_matrix(feats.column("image_embedding"), np.float32))
    else:
        emb = np.zeros((len(uid), 0), np.float32)
    size = ctx.read_input(VALIDATE, columns=["uid", "width", "height"])
    cand = ctx.read_input(KEYWORD_FILTER, columns=["uid", "caption"])
    area_of = dict(
        zip(
            size.column("uid").to_pylist(),
            (
                np.asarray(size.column("width").fill_null(0), np.int64)
                * np.asarray(size.column("height").fill_null(0), np.int64)
            ).tolist(),
            strict=True,
        )
    )
    cap_of = dict(
        zip(cand.column("uid").to_pylist(), cand.column("caption").to_pylist(), strict=True)
    )
    keys = uid.tolist()
    area = np.array([area_of.get(k, 0) for k in keys], np.int64)
    caplen = np.array([len(cap_of.get(k) or "") for k in keys], np.int64)
    return Items(uid, phash, emb, area, caplen)


def build_result(new: Items, dec: Decisions, redo: bool = False) -> StageResult:
    n = len(new)
    output = pa.table(
        {
            "uid": pa.array(new.uid, pa.uint64()),
            "keep": pa.array(dec.keep),
            "reason": pa.array(dec.reason, pa.string()),
            "duplicate_of": pa.array(
                np.where(dec.keep, 0, dec.duplicate_of), pa.uint64(), mask=dec.keep
            ),
            "distance": pa.array(dec.distance, pa.float32(), mask=dec.keep),
            "clip_score": pa.nulls(n, pa.float32()),
            "rs_prob": pa.nulls(n, pa.float32()),
        },
        schema=DECISIONS,
    )
    gone = np.flatnonzero(~dec.keep)
    removed = pa.table(
        {
            "uid": pa.array(new.uid[gone], pa.uint64()),
            "reason": pa.array([dec.reason[i] for i in gone], pa.string()),
            "detail": pa.array([dec.detail[i] for i in gone], pa.string()),
        }
    )
    counts = {
        "duplicates_phash": dec.counts[REASON_PHASH],
        "duplicates_embedding": dec.counts[REASON_EMBEDDING],
        "index_size_before": dec.counts["index_size"],
        "redo": int(redo),
    }
    return StageResult(output=output, removed=removed, counts=counts)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def posixpath_join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cat(arrays: list[np.ndarray], dtype=np.int64) -> np.ndarray:
    arrays = [a for a in arrays if len(a)]
    if not arrays:
        return np.zeros(0, dtype)
    return np.concatenate(arrays).astype(dtype, copy=False)


def _empty_pairs(dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, dtype)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.size == 0:
        return x
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
