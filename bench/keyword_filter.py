"""Benchmark of the remote-sensing keyword filter (tasks/keywords) against two references.

Generates a LAION-2B-format metadata parquet (URL, TEXT, WIDTH, HEIGHT, similarity, hash,
punsafe, pwatermark) whose captions are sampled from the real fixture captions (img2dataset's
test_10000 TEXT, CC3M validation, a few RS-caption-dataset sentences, and the web captions the
vocabulary keeps, oversampled so that about 1 % of the rows match), then measures, each in a
fresh child process so that peak RSS is per measurement:

  floor   DuckDB  SELECT sum(length(TEXT)) FROM read_parquet(file)          (a bare scan)
  ours    DuckDB  COPY (SELECT *, <sql_matched> AS keywords FROM read_parquet(file)
                        WHERE <sql_keep>) TO out.parquet                     (what the stage runs)
  pandas  pandas  read_parquet(TEXT) + Series.str.contains(<the same term regex>)
                  on a subsample (--pandas-rows), reported as rows/s

Usage:  python bench/keyword_filter.py [--rows 10_000_000] [--out-dir tmp] [--threads 2]
Needs ../shared/fixtures (the real captions); exits with a message when it is absent.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
FIXTURES = PROJECT.parent / "shared" / "fixtures"
sys.path.insert(0, str(PROJECT))

TARGET_FLOOR_RATIO = 2.0  # ours may take at most 2x the bare scan
TARGET_PANDAS_SPEEDUP = 20.0  # and must be at least 20x faster than pandas str.contains
TARGET_RSS_BYTES = 2 * 1024**3
ROW_GROUP = 250_000  # rows per parquet row group (DuckDB parallelises over row groups)


# ---------------------------------------------------------------------------------------------
# data


def _fixture_captions() -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    meta = FIXTURES / "metadata"
    web = pq.read_table(meta / "test_10000.parquet", columns=["TEXT"])["TEXT"].to_pylist()
    urls = pq.read_table(meta / "test_10000.parquet", columns=["URL"])["URL"].to_pylist()
    with open(meta / "Validation_GCC-1.1.0-Validation.tsv", encoding="utf-8") as fh:
        for line in fh:
            caption, _, url = line.rstrip("\n").partition("\t")
            web.append(caption)
            urls.append(url)
    with open(meta / "coyo_readme_examples.csv", encoding="utf-8") as fh:
        web.extend(row["text"] for row in csv.DictReader(fh))
    rs: list[str] = []
    for name in ("test_caps.txt", "train_caps.txt"):
        text = (FIXTURES / "rs_captions" / "rsitmd_captions" / name).read_text(encoding="utf-8")
        rs.extend(line.strip() for line in text.splitlines() if line.strip())
    return {"web": [w for w in web if w], "urls": [u for u in urls if u], "rs": rs}


def generate(path: Path, rows: int, seed: int = 0) -> dict[str, float]:
    """Write ``rows`` LAION-format rows to ``path`` in 1M-row chunks (bounded memory)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tasks.keywords import load_vocabulary

    vocab = load_vocabulary()
    caps = _fixture_captions()
    web, rs, urls = caps["web"], caps["rs"], caps["urls"]
    positives = [c for c in web if vocab.match(c)]
    rng = np.random.default_rng(seed)
    schema = pa.schema(
        [
            ("URL", pa.string()),
            ("TEXT", pa.string()),
            ("WIDTH", pa.int64()),
            ("HEIGHT", pa.int64()),
            ("similarity", pa.float64()),
            ("hash", pa.int64()),
            ("punsafe", pa.float32()),
            ("pwatermark", pa.float32()),
        ]
    )
    web_a, rs_a, pos_a, url_a = (pa.array(x, pa.string()) for x in (web, rs, positives, urls))
    chunk = 1_000_000
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            # 98.3 % web alt-text, 1 % RS-dataset sentences, 0.7 % known positives
            kind = rng.random(n)
            text = web_a.take(pa.array(rng.integers(0, len(web), n)))
            rs_fill = rs_a.take(pa.array(rng.integers(0, len(rs), n)))
            pos_fill = pos_a.take(pa.array(rng.integers(0, len(positives), n)))
            text = pc.if_else(pa.array((kind >= 0.983) & (kind < 0.993)), rs_fill, text)
            text = pc.if_else(pa.array(kind >= 0.993), pos_fill, text)
            url = url_a.take(pa.array(rng.integers(0, len(urls), n)))
            table = pa.table(
                [
                    url,
                    text,
                    pa.array(rng.integers(64, 2048, n)),
                    pa.array(rng.integers(64, 2048, n)),
                    pa.array(rng.uniform(0.28, 0.45, n)),
                    pa.array(rng.integers(-(2**62), 2**62, n)),
                    pa.array(rng.beta(1, 30, n).astype("float32")),
                    pa.array(rng.beta(1, 8, n).astype("float32")),
                ],
                schema=schema,
            )
            writer.write_table(table, row_group_size=ROW_GROUP)
    return {"rows": rows, "bytes": path.stat().st_size}


# ---------------------------------------------------------------------------------------------
# measurements (each runs in its own child process)


def _connect(threads: int, memory: str):
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute(f"SET memory_limit = '{memory}'")
    con.execute("SET preserve_insertion_order = false")
    return con


def measure(which: str, args: argparse.Namespace) -> dict:
    """One measurement in this (child) process. ``seconds`` is wall time of the timed part,
    ``cpu`` the process CPU time (all threads) of the same part: on a shared machine the CPU
    ratio is the steadier of the two."""
    import pyarrow.parquet as pq

    from tasks.keywords import load_vocabulary

    vocab = load_vocabulary()
    file = args.file
    result: dict = {"which": which}
    if which == "generate":
        w0, c0 = time.perf_counter(), time.process_time()
        result.update(generate(Path(file), args.rows))
    elif which == "pandas":
        import pandas as pd

        w0, c0 = time.perf_counter(), time.process_time()
        batches, got = [], 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=100_000, columns=["TEXT"]):
            batches.append(batch.to_pandas())
            got += batch.num_rows
            if got >= args.pandas_rows:
                break
        frame = pd.concat(batches, ignore_index=True).iloc[: args.pandas_rows]
        hits = frame["TEXT"].str.contains(vocab.term_pattern, regex=True, na=False)
        result.update(rows=len(frame), kept=int(hits.sum()), dtype=str(frame["TEXT"].dtype))
    elif which == "stage":
        from storage.root import DatasetRoot
        from storage.stage import Partition, run_partition
        from tasks.keyword_filter import KeywordFilterStage

        root = DatasetRoot(Path(args.out_dir) / f"stage-root-{os.getpid()}")
        stage = KeywordFilterStage("laion2b", memory_limit=args.memory_limit, threads=args.threads)
        w0, c0 = time.perf_counter(), time.process_time()
        outcome = run_partition(root, stage, Partition("laion2b", "bench", str(file)))
        if outcome.status != "done":
            raise SystemExit(f"stage failed: {outcome.error}")
        result.update(rows=pq.ParquetFile(file).metadata.num_rows, kept=outcome.rows)
    else:
        out = Path(args.out_dir) / "keyword_hits.parquet"
        sql = {
            "floor": f"SELECT sum(length(TEXT)) FROM read_parquet('{file}')",
            "scan_all": "SELECT sum(length(TEXT)), sum(length(URL)), sum(WIDTH), sum(HEIGHT), "
            "sum(similarity), sum(hash), sum(punsafe), sum(pwatermark) "
            f"FROM read_parquet('{file}')",
            "filter_only": f"SELECT count(*) FROM read_parquet('{file}') "
            f"WHERE {vocab.sql_keep('TEXT')}",
            "ours": f"COPY (SELECT *, {vocab.sql_matched('TEXT')} AS keywords "
            f"FROM read_parquet('{file}') WHERE {vocab.sql_keep('TEXT')}) "
            f"TO '{out}' (FORMAT parquet, COMPRESSION zstd)",
            # the same rows, hits compacted (and in file order) before the keywords are listed:
            # the filter's output chunks hold ~20 rows each, and per-chunk costs dominate
            "ours_dense": f"COPY (SELECT * EXCLUDE (file_row_number), "
            f"{vocab.sql_matched('TEXT')} AS keywords FROM (SELECT * FROM "
            f"read_parquet('{file}', file_row_number = true) WHERE {vocab.sql_keep('TEXT')} "
            f"ORDER BY file_row_number)) TO '{out}' (FORMAT parquet, COMPRESSION zstd)",
        }[which]
        con = _connect(args.threads, args.memory_limit)
        w0, c0 = time.perf_counter(), time.process_time()
        con.execute(sql).fetchall()
        result["rows"] = pq.ParquetFile(file).metadata.num_rows
        if which.startswith("ours"):
            result["kept"] = pq.ParquetFile(out).metadata.num_rows
    result["seconds"] = time.perf_counter() - w0
    result["cpu"] = time.process_time() - c0
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def _child(which: str, args: argparse.Namespace, file: Path) -> dict:
    """Run one measurement in a fresh interpreter (so its peak RSS is its own)."""
    cmd = [sys.executable, __file__, "--measure", which, "--file", str(file)]
    cmd += ["--out-dir", str(args.out_dir), "--threads", str(args.threads)]
    cmd += ["--memory-limit", args.memory_limit, "--pandas-rows", str(args.pandas_rows)]
    cmd += ["--rows", str(args.rows)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measurement {which} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


NAMES = {
    "floor": "(a) floor: DuckDB `SELECT sum(length(TEXT))`",
    "stage": "(s) the keyword stage itself: run_partition (uid, keywords, ledger, marker)",
    "ours": "(b) ours: `COPY (SELECT *, keywords ... WHERE keep)` to parquet",
    "pandas": "(c) pandas `str.contains` (same regex)",
    "ours_dense": "(b') ours, hits compacted by `ORDER BY file_row_number` before keywords",
    "scan_all": "ref: DuckDB scan of all 8 columns (what the COPY must decode)",
    "filter_only": "ref: DuckDB `count(*) WHERE sql_keep` (the filter alone)",
}


def report(runs: dict[str, dict], args: argparse.Namespace) -> str:
    rate = {k: r["rows"] / r["seconds"] for k, r in runs.items()}
    ours, floor, pandas = runs["ours"], runs["floor"], runs["pandas"]
    floor_ratio = ours["seconds"] / floor["seconds"]
    floor_cpu_ratio = ours["cpu"] / floor["cpu"]
    pandas_speedup = rate["ours"] / rate["pandas"]
    peak = ours["peak_rss"]
    ok = {True: "met", False: "NOT met"}
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cpus (shared with other jobs), "
        f"DuckDB threads={args.threads}, memory_limit={args.memory_limit}, "
        f"row groups of {ROW_GROUP:,} rows",
        f"rows: {ours['rows']:,}; kept by ours: {ours['kept']:,} "
        f"({ours['kept'] / ours['rows']:.2%}); pandas on the first {pandas['rows']:,} rows "
        f"({pandas['dtype']} dtype), "
        f"matched {pandas['kept']:,} ({pandas['kept'] / pandas['rows']:.2%})",
        "",
        "| measurement | rows | wall s | CPU s | rows/s (wall) | peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k in ("floor", "stage", "ours", "ours_dense", "pandas", "scan_all", "filter_only"):
        if k in runs:
            r = runs[k]
            lines.append(
                f"| {NAMES[k]} | {r['rows']:,} | {r['seconds']:.2f} | {r['cpu']:.2f} | "
                f"{rate[k] / 1e6:,.2f} M | {r['peak_rss'] / 2**20:,.0f} MiB |"
            )
    lines += [
        "",
        "| target | measured | |",
        "|---|---:|---|",
        f"| ours / floor, wall time <= {TARGET_FLOOR_RATIO:g}x | {floor_ratio:.2f}x | "
        f"{ok[floor_ratio <= TARGET_FLOOR_RATIO]} |",
        f"| ours / floor, CPU time (same target) | {floor_cpu_ratio:.2f}x | "
        f"{ok[floor_cpu_ratio <= TARGET_FLOOR_RATIO]} |",
        f"| ours / pandas, rows/s >= {TARGET_PANDAS_SPEEDUP:g}x | {pandas_speedup:,.1f}x | "
        f"{ok[pandas_speedup >= TARGET_PANDAS_SPEEDUP]} |",
        f"| ours peak RSS < 2 GiB | {peak / 2**20:,.0f} MiB | {ok[peak < TARGET_RSS_BYTES]} |",
    ]
    cpu_speedup = (pandas["cpu"] / pandas["rows"]) / (ours["cpu"] / ours["rows"])
    lines.append(
        f"| ours / pandas, CPU time per row (same target) | {cpu_speedup:,.1f}x | "
        f"{ok[cpu_speedup >= TARGET_PANDAS_SPEEDUP]} |"
    )
    dense = runs["ours_dense"]
    dense_pandas = (dense["rows"] / dense["seconds"]) / rate["pandas"]
    lines += [
        f"| (b') ours_dense / floor, wall (CPU) | {dense['seconds'] / floor['seconds']:.2f}x "
        f"({dense['cpu'] / floor['cpu']:.2f}x) | {ok[dense['seconds'] / floor['seconds'] <= 2]} |",
        f"| (b') ours_dense / pandas, rows/s | {dense_pandas:,.1f}x | "
        f"{ok[dense_pandas >= TARGET_PANDAS_SPEEDUP]} |",
    ]
    if "stage" in runs:
        st = runs["stage"]
        st_pandas = (st["rows"] / st["seconds"]) / rate["pandas"]
        lines += [
            f"| (s) the stage / floor, wall (CPU) | {st['seconds'] / floor['seconds']:.2f}x "
            f"({st['cpu'] / floor['cpu']:.2f}x) | {ok[st['seconds'] / floor['seconds'] <= 2]} |",
            f"| (s) the stage / pandas, rows/s | {st_pandas:,.1f}x | "
            f"{ok[st_pandas >= TARGET_PANDAS_SPEEDUP]} |",
            f"| (s) the stage, peak RSS < 2 GiB | {st['peak_rss'] / 2**20:,.0f} MiB | "
            f"{ok[st['peak_rss'] < TARGET_RSS_BYTES]} |",
        ]
    if "scan_all" in runs:
        scan = runs["scan_all"]
        for key, label in (("ours", "ours"), ("ours_dense", "(b') ours_dense")):
            lines.append(
                f"| (context) {label} / all-column scan, wall (CPU) | "
                f"{runs[key]['seconds'] / scan['seconds']:.2f}x "
                f"({runs[key]['cpu'] / scan['cpu']:.2f}x) | |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--out-dir", default="tmp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-limit", default="1GB")
    ap.add_argument("--pandas-rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=1, help="best of N for the DuckDB runs")
    ap.add_argument("--keep-file", action="store_true", help="reuse/keep the generated parquet")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return 0
    if not FIXTURES.is_dir():
        print(f"shared fixtures not found at {FIXTURES}: nothing to sample captions from")
        return 2

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    file = out_dir / f"laion_like_{args.rows}.parquet"
    if not (args.keep_file and file.exists()):
        info = _child("generate", args, file)
        print(
            f"generated {info['rows']:,} rows, {info['bytes'] / 1e6:,.0f} MB in "
            f"{info['seconds']:.1f} s -> {file}",
            flush=True,
        )

    runs: dict[str, dict] = {}
    for which in ("floor", "stage", "ours", "ours_dense", "pandas", "scan_all", "filter_only"):
        reps = 1 if which == "pandas" else max(1, args.repeat)
        for _ in range(reps):
            r = _child(which, args, file)
            if which not in runs or r["seconds"] < runs[which]["seconds"]:
                runs[which] = r
        print(f"  {which}: {runs[which]['seconds']:.2f} s", file=sys.stderr, flush=True)
    print()
    print(report(runs, args))
    if not args.keep_file:
        file.unlink(missing_ok=True)
    (out_dir / "keyword_hits.parquet").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
