"""The ``rs5m`` command: a thin layer over the flows."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

OFFLINE_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "CRITICAL",  # the command prints its own summary
}


def _setup_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


# -- formatting ----------------------------------------------------------------------------------
def format_rows(rows: list[dict[str, Any]], columns: Sequence[str], fmt: str) -> str:
    """Rows as an aligned text table, CSV or JSON; ``None`` prints as an empty cell."""
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in columns} for r in rows], indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if r.get(c) is None else r.get(c) for c in columns] for r in rows])
        return buf.getvalue().rstrip("\n")
    cells = [["" if r.get(c) is None else _cell(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
        for i, c in enumerate(columns)
    ]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(columns, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append(
            "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


# -- commands ------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    from schemas.config import load_config

    config = load_config(args.config)
    return run_build(
        config,
        args.root,
        lock_wait=args.wait,
        show_progress=not args.quiet,
        retry_failed=args.retry_failed,
        reshard=args.reshard,
    )


def run_build(
    config: Any,
    root: str,
    lock_wait: float = 0.0,
    show_progress: bool = True,
    retry_failed: bool = False,
    reshard: bool = False,
) -> int:
    from flows.build import build_flow
    from storage.lock import RootLocked

    try:
        summary = build_flow(
            config=config.model_dump(mode="json", by_alias=True),
            root=root,
            lock_wait=lock_wait,
            show_progress=show_progress,
            retry_failed=retry_failed,
            reshard=reshard,
        )
    except RootLocked as exc:
        print(f"rs5m: {exc}", file=sys.stderr)
        return 3
    if summary["processed_partitions"] == 0 and summary["failed_partitions"] == 0:
        print("Nothing new: every partition is up to date; no stage did any work.")
    if summary["statistics"]:
        from storage.catalog import STATS_COLUMNS

        print()
        print(format_rows(summary["statistics"], STATS_COLUMNS, "table"))
    if summary["failed_partitions"]:
        print(
            f"\n{summary['failed_partitions']} partition(s) failed; `rs5m status --root {root}` "
            "lists them, and the next build retries only them.",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from storage import catalog
    from storage.root import DatasetRoot

    root = DatasetRoot(args.root)
    with catalog.connect(root) as con:
        rows = catalog.statistics(con)
    if not rows and args.format == "table":
        print(f"no committed partitions under {root.url}")
        return 0
    print(format_rows(rows, catalog.STATS_COLUMNS, args.format))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from storage import catalog
    from storage.root import DatasetRoot

    root = DatasetRoot(args.root)
    with catalog.connect(root) as con:
        entries = catalog.status(con, root)
    if not entries:
        print(f"nothing built yet under {root.url}")
        return 0
    rows = [
        {
            "stage": e.stage,
            "source": e.source,
            "done": e.done,
            "failed": e.failed,
            "pending": e.pending,
        }
        for e in entries
    ]
    print(format_rows(rows, ["stage", "source", "done", "failed", "pending"], "table"))
    errors = [(e.stage, e.source, p, err) for e in entries for p, err in e.errors]
    if errors:
        print("\nfailed partitions:")
        for stage, source, part, err in errors:
            print(f"  {stage} {source}/{part}: {err}")
    return 1 if errors else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from schemas.config import load_config
    from storage.root import DatasetRoot
    from tasks.shard import read_manifest, verify_shards

    shard_cfg = load_config(args.config).shard if args.config else None
    root = DatasetRoot(args.root)
    problems = verify_shards(root, shard_cfg)
    manifest = read_manifest(root, shard_cfg)
    if problems:
        for problem in problems:
            print(f"PROBLEM {problem}")
        print(f"{len(problems)} problem(s) in the shards of {root.url}", file=sys.stderr)
        return 1
    n = len(manifest.shards) if manifest else 0
    samples = sum(s.samples for s in manifest.shards) if manifest else 0
    print(f"ok: {n} shards, {samples:,} samples match the manifest")
    return 0


def cmd_train_detector(args: argparse.Namespace) -> int:
    from flows.train_detector import train_detector_flow
    from schemas.config import load_config

    embed = load_config(args.config).embed if args.config else None
    summary = train_detector_flow(
        positive_dirs=args.positive,
        negative_dirs=args.negative,
        out_path=args.out,
        model_name=args.model or (embed.model_name if embed else "ViT-B-32"),
        checkpoint=args.checkpoint or (embed.checkpoint if embed else None),
        pretrained=embed.pretrained if embed and not args.checkpoint else None,
        device=embed.device if embed else "cpu",
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    print(
        json.dumps({k: v for k, v in summary.items() if not isinstance(v, list | dict)}, indent=1)
    )
    return 0


def cmd_setup_nltk(args: argparse.Namespace) -> int:
    from tasks.geotag import setup_nltk

    setup_nltk(args.dir)
    print("NLTK models installed" + (f" in {args.dir}" if args.dir else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rs5m.demo import run_demo

    return run_demo(args.root, show_progress=not args.quiet)


# -- entry point ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rs5m", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="run the pipeline; only new or changed partitions do work")
    p.add_argument("--config", required=True, help="TOML build configuration")
    p.add_argument("--root", required=True, help="dataset root: a folder or an fsspec URL")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for another build")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="refetch the downloads that failed for a transient reason (timeout, 5xx, connection)",
    )
    p.add_argument("--reshard", action="store_true", help="rewrite every shard from scratch")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("verify", help="check every shard against the manifest")
    p.add_argument("--root", required=True)
    p.add_argument("--config", help="build config (for a non-default shard folder)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("train-detector", help="train the remote-sensing image detector")
    p.add_argument("--positive", nargs="+", required=True, help="folders of remote-sensing images")
    p.add_argument("--negative", nargs="+", required=True, help="folders of other images")
    p.add_argument("--out", required=True, help="where to save the detector (.npz)")
    p.add_argument("--config", help="build config: its [embed] backbone is used")
    p.add_argument("--model", help="open_clip model name (overrides the config)")
    p.add_argument("--checkpoint", help="local checkpoint (overrides the config)")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_detector)

    p = sub.add_parser("setup-nltk", help="download NLTK's NER models (needs a network)")
    p.add_argument("--dir", help="NLTK data folder (default: NLTK's own)")
    p.set_defaults(func=cmd_setup_nltk)

    p = sub.add_parser("stats", help="the per-source statistics table")
    p.add_argument("--root", required=True)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("status", help="partitions done / failed / pending per stage and source")
    p.add_argument("--root", required=True)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="build the bundled sample end to end")
    p.add_argument("--root", default="demo-root")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _setup_env()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FileNotFoundError as exc:
        print(f"rs5m: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
