"""``mechlens store info|verify PATH``."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    store = subparsers.add_parser("store", help="inspect and check an activation store")
    actions = store.add_subparsers(dest="store_command", metavar="ACTION")
    actions.required = True

    info = actions.add_parser("info", help="layers, rows, dims, dtype, size on disk, shards")
    info.add_argument("path", help="store directory")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=_info)

    verify = actions.add_parser("verify", help="re-read every committed chunk and check its checksum")
    verify.add_argument("path", help="store directory")
    verify.add_argument("--layer", action="append", help="only these layers (repeatable)")
    verify.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    verify.set_defaults(handler=_verify)


def _info(args: argparse.Namespace) -> int:
    from activation_store.jsonutil import dumps as json_dumps
    from activation_store import open_store

    info = open_store(args.path).info()
    print(json_dumps(info.to_json(), indent=1) if args.json else info)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from activation_store import open_store

    report = open_store(args.path).verify(layers=args.layer, progress=not args.no_progress)
    mib = report.bytes_checked / 2**20
    if report.ok:
        print(f"ok: {report.chunks_checked} chunks ({mib:.1f} MiB) verified, no errors")
        return 0
    print(f"FAILED: {len(report.bad_chunks)} of {report.chunks_checked} chunks are bad:")
    for bad in report.bad_chunks:
        print(f"  {bad}")
    return 1
