"""``bigmodel-registry``: registered models, versions, aliases and lineage on MLflow.

    bigmodel-registry list
    bigmodel-registry show chest-xray
    bigmodel-registry register runs/demo/model --name chest-xray --alias staging
    bigmodel-registry promote chest-xray 3 --alias production
    bigmodel-registry rollback chest-xray --alias production
    bigmodel-registry lineage models:/chest-xray@production

The store is ``--uri``, else ``MLFLOW_TRACKING_URI``, else the local default that
``bigmodel-train tracking.enabled=true`` writes (``sqlite:///runs/mlflow.db``). Errors are one
line naming the setting or the model (exit code 2).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from mlflow.exceptions import MlflowException
from tabulate import tabulate

from bigmodel.registry import store, versions

HEADLINE_METRICS = 3
"""Validation figures shown per version in ``show`` (the full set is in ``lineage``)."""


def _when(millis: int | None) -> str:
    if not millis:
        return "-"
    return _dt.datetime.fromtimestamp(millis / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """Plain columns under a dashed rule; an empty cell shows as ``-``."""
    cells = [["-" if c in (None, "") else str(c) for c in row] for row in rows]
    return tabulate(cells, headers=header, tablefmt="simple", disable_numparse=True)


def _headline(metrics: dict[str, float]) -> str:
    """A few validation scores: no counts, no per-class entries (``auroc_0``)."""
    names = [
        k
        for k in sorted(metrics)
        if k.startswith("val/")
        and k.rsplit("/", 1)[-1] not in ("count", "num_samples")
        and not re.search(r"_\d+$", k)
    ]
    return ", ".join(f"{k[4:]}={metrics[k]:.3f}" for k in names[:HEADLINE_METRICS])


def _list(args: argparse.Namespace) -> int:
    rows = versions.list_models(args.uri)
    if not rows:
        print(f"no registered models in {args.uri}")
        return 0
    print(
        _table(
            ["model", "versions", "latest", "aliases", "updated (UTC)"],
            [
                [
                    r["name"],
                    r["versions"],
                    r["latest"],
                    " ".join(f"@{a}={v}" for a, v in r["aliases"].items()),
                    _when(r["updated"]),
                ]
                for r in rows
            ],
        )
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    rows = versions.model_versions(args.name, args.uri)
    print(f"{args.name} ({args.uri})")
    print(
        _table(
            ["version", "aliases", "status", "created (UTC)", "run", "git", "metrics"],
            [
                [
                    r["version"],
                    " ".join(f"@{a}" for a in r["aliases"]),
                    r["status"],
                    _when(r["created"]),
                    (r["run_id"] or "")[:12],
                    (r["tags"].get("bigmodel.git_commit") or "")[:10],
                    _headline(r["metrics"]),
                ]
                for r in rows
            ],
        )
    )
    return 0


def _register(args: argparse.Namespace) -> int:
    version = versions.register_folder(
        args.folder, args.name, args.uri, experiment=args.experiment, alias=args.alias
    )
    alias = f" as @{args.alias}" if args.alias else ""
    print(f"registered {args.folder} as models:/{args.name}/{version.version}{alias}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    previous = versions.promote(args.name, args.version, args.alias, args.uri)
    before = f" (was version {previous})" if previous else ""
    print(f"models:/{args.name}@{args.alias} -> version {args.version}{before}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    old, new = versions.rollback(args.name, args.alias, args.uri, to=args.to)
    print(f"models:/{args.name}@{args.alias} rolled back: version {old} -> {new}")
    return 0


def _lineage(args: argparse.Namespace) -> int:
    info = versions.lineage(args.model, args.uri)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    metrics = info.pop("metrics", {}) or {}
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = " ".join(f"@{a}" for a in value) if key == "aliases" else value
        print(f"{key:<{width}}  {'-' if shown in (None, '') else shown}")
    for key in sorted(metrics):
        if key.startswith("val/"):
            print(f"{'metric':<{width}}  {key} = {metrics[key]:.4g}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigmodel-registry", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered models with their aliases")
    s = sub.add_parser("show", help="the versions of a model")
    s.add_argument("name")
    r = sub.add_parser("register", help="log a model folder and register it as a new version")
    r.add_argument("folder", help="a model folder (a run's model/)")
    r.add_argument("--name", required=True, help="registered model name")
    r.add_argument("--experiment", default="bigmodel", help="experiment of the logging run")
    r.add_argument("--alias", default=None, help="also point this alias at the new version")
    p = sub.add_parser("promote", help="point an alias at a version")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--alias", default="production", help="alias to move (default production)")
    b = sub.add_parser("rollback", help="move an alias back to its previous version")
    b.add_argument("name")
    b.add_argument("--alias", default="production", help="alias to move (default production)")
    b.add_argument("--to", type=int, default=None, help="this version instead of the previous")
    lin = sub.add_parser("lineage", help="run, sweep, data, code and scale behind a version")
    lin.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    lin.add_argument("--json", action="store_true", help="print JSON")
    return parser


COMMANDS = {
    "list": _list,
    "show": _show,
    "register": _register,
    "promote": _promote,
    "rollback": _rollback,
    "lineage": _lineage,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``bigmodel-registry``; returns the exit code."""
    args = _parser().parse_args(argv)
    args.uri = store.resolve_uri(args.uri)
    try:
        return COMMANDS[args.command](args)
    except store.RegistryError as err:
        print(f"bigmodel-registry: error: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:
        first = str(err.message).splitlines()[0]
        print(f"bigmodel-registry: error: {first} (--uri {args.uri})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
