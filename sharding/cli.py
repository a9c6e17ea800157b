"""``bigmodel-shard``: build, verify and inspect WebDataset shards of medical datasets.

    bigmodel-shard build --source nnunet --input Task01 --out shards/task01 --workers 4
    bigmodel-shard verify shards/task01 --world-size 16 --loader-workers 4
    bigmodel-shard build ... --out s3://bucket/task01   (then: verify s3://bucket/task01)
    bigmodel-shard inspect shards/task01 --show 16 --out grid.png

Bad input stops with one line naming the file and the fix (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from sharding.build import LAYOUTS, BuildOptions, build_shards
from sharding.format import read_manifest
from sharding.inspection import save_grid, save_histograms, summary_table
from sharding.readers import READERS
from sharding.records import SourceError
from sharding.splits import parse_ratios
from sharding.verify import verify_shards

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
}


def _size(text: str) -> int:
    """``"256MB"`` / ``"1G"`` / ``"1000000"`` -> bytes."""
    number = text.rstrip("KMGBkmgb")
    unit = text[len(number) :].upper()
    try:
        value = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1G)") from None
    return value


def _patch(text: str) -> tuple[int, int, int]:
    try:
        d, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not D,H,W: {text!r} (e.g. 32,64,64)") from None
    return d, h, w


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigmodel-shard", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="turn a source dataset into shards + dataset.json")
    b.add_argument("--source", required=True, choices=sorted(READERS), help="source format")
    b.add_argument("--input", required=True, help="source folder or file")
    b.add_argument(
        "--out",
        required=True,
        help="output folder (new, or a resumable build), or an object-store prefix (s3://B/P)",
    )
    b.add_argument(
        "--stage",
        metavar="DIR",
        help="--out is a URL: build in this local folder before the upload (default: temp dir)",
    )
    b.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="reader option (repeatable; `--option help=1` lists them)",
    )
    b.add_argument("--layout", choices=LAYOUTS, default="2d")
    b.add_argument("--axis", choices=("z", "y", "x"), default="z", help="slicing axis")
    b.add_argument("--context", type=int, default=1, help="2.5d: neighbour slices each side")
    b.add_argument("--patch", type=_patch, help="3d: patch size D,H,W (default whole volumes)")
    b.add_argument("--split-ratios", default="0.8,0.1,0.1", help="train,val,test by patient")
    b.add_argument("--seed", type=int, default=0, help="seed of the patient-to-split assignment")
    b.add_argument("--use-source-split", action="store_true", help="keep the source's own split")
    b.add_argument(
        "--folds",
        type=int,
        default=0,
        metavar="K",
        help="also deal the train+val patients into K cross-validation folds (bigmodel-train --fold)",
    )
    b.add_argument("--max-shard-bytes", type=_size, default="256MB")
    b.add_argument("--max-shard-samples", type=int, default=1000)
    b.add_argument("--workers", type=int, default=1, help="processes loading and encoding")
    b.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="load and encode as Ray tasks (cluster ADDRESS, or local Ray)",
    )
    b.add_argument("--skip-bad", action="store_true", help="record bad items and go on")
    b.add_argument("--name", default="", help="dataset name (default: the input's name)")
    b.add_argument("--dtype", default=None, help="cast images to this dtype (e.g. float32)")
    b.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    v = sub.add_parser("verify", help="check checksums, decoding, splits and shard counts")
    v.add_argument("dir", help="shard folder or object-store prefix (s3://bucket/prefix)")
    v.add_argument("--world-size", type=int, default=1, help="training ranks planned")
    v.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers per rank")

    i = sub.add_parser("inspect", help="summary table; --show N writes a PNG grid")
    i.add_argument("dir")
    i.add_argument("--show", type=int, default=0, help="samples to draw")
    i.add_argument("--out", default="grid.png", help="PNG file for --show")
    i.add_argument(
        "--histogram",
        metavar="PNG",
        help="write intensity histograms (raw and after --intensity) of --show or 64 samples",
    )
    i.add_argument(
        "--intensity",
        default="auto",
        help="data.intensity scheme for --histogram (auto, ct, ct_window[:NAME], mr, dataset)",
    )
    return parser


def _reader(args: argparse.Namespace):
    cls = READERS[args.source]
    options = {}
    for text in args.option:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise SourceError(
                f"--option {text}", "expected KEY=VALUE", f"options: {list(cls.OPTIONS)}"
            )
        options[key.strip()] = value.strip()
    # A build option (BuildOptions.slice_labels), not the reader's.
    options.pop("slice_labels", None)
    return cls(args.input, **options)


def _slice_labels(option: list[str]) -> str:
    """``-o slice_labels=POLICY`` (the last one wins), ``auto`` when absent."""
    pairs = [o.partition("=") for o in option]
    values = [value.strip() for key, _, value in pairs if key.strip() == "slice_labels"]
    return values[-1] if values else "auto"


def _build(args: argparse.Namespace, argv: Sequence[str]) -> int:
    options = BuildOptions(
        layout=args.layout,
        axis=args.axis,
        context=args.context,
        patch=args.patch,
        split_ratios=parse_ratios(args.split_ratios),
        seed=args.seed,
        use_source_split=args.use_source_split,
        folds=args.folds,
        max_shard_bytes=args.max_shard_bytes,
        max_shard_samples=args.max_shard_samples,
        workers=args.workers,
        use_ray=args.ray is not None,
        ray_address=args.ray or None,
        skip_bad=args.skip_bad,
        name=args.name,
        dtype=args.dtype,
        command=shlex.join(["bigmodel-shard", *argv]),
        progress=not args.quiet,
        slice_labels=_slice_labels(args.option),
        stage_dir=args.stage,
    )
    if any(o.partition("=")[0].strip() == "help" for o in args.option):
        print(f"options of --source {args.source}:")
        for key, text in READERS[args.source].OPTIONS.items():
            print(f"  {key}: {text}")
        return 0
    build_shards(_reader(args), args.out, options)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bigmodel-shard`` and ``python -m sharding``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            return _build(args, argv)
        if args.command == "verify":
            report = verify_shards(args.dir, args.world_size, args.loader_workers)
            print(report.format())
            return 0 if report.ok else 1
        print(summary_table(read_manifest(args.dir)))
        if args.show:
            print(f"wrote {save_grid(args.dir, args.show, args.out)}")
        if args.histogram:
            hist = save_histograms(args.dir, args.show or 64, args.histogram, args.intensity)
            print(f"wrote {hist}")
        return 0
    except SourceError as err:
        print(f"bigmodel-shard: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bigmodel-shard: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
