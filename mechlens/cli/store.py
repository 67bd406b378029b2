"""``mechlens store info|verify PATH``."""
from __future__ import annotations

import argparse

from mechlens.cli import options


def register(subparsers: argparse._SubParsersAction) -> None:
    store = subparsers.add_parser("store", help="inspect and check an activation store")
    actions = store.add_subparsers(dest="store_command", metavar="ACTION")
    actions.required = True

    info = actions.add_parser("info", help="layers, rows, dims, dtype, size on disk, shards")
    info.add_argument("path", help="store directory")
    options.add_run_options(info, progress=False)  # reads the manifest only: nothing to wait for
    info.set_defaults(handler=_info)

    verify = actions.add_parser(
        "verify", help="re-read every committed chunk and check its checksum",
        description="Re-read every committed chunk of the store at PATH (of --layer only, if given) and check its "
                    "checksum; exit 1 if any chunk is bad.")
    verify.add_argument("path", help="store directory")
    options.LAYERS.add(verify)
    options.add_run_options(verify)
    verify.set_defaults(handler=_verify)


def _info(args: argparse.Namespace) -> int:
    from activation_store import open_store

    info = open_store(args.path).info()
    if args.json:
        options.print_json(info.to_json(), indent=1)
    else:
        print(info)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from activation_store import open_store

    report = open_store(args.path).verify(layers=args.layer, progress=options.wants_progress(args))
    if args.json:
        bad_chunks = [{"layer": bad.layer, "shard": bad.shard, "segment": bad.segment, "chunk": bad.chunk,
                       "reason": bad.reason} for bad in report.bad_chunks]
        options.print_json({"ok": report.ok, "chunks_checked": report.chunks_checked,
                            "bytes_checked": report.bytes_checked, "bad_chunks": bad_chunks})
        return 0 if report.ok else 1
    mib = report.bytes_checked / 2**20
    if report.ok:
        print(f"ok: {report.chunks_checked} chunks ({mib:.1f} MiB) verified, no errors")
        return 0
    print(f"FAILED: {len(report.bad_chunks)} of {report.chunks_checked} chunks are bad:")
    for bad in report.bad_chunks:
        print(f"  {bad}")
    return 1
