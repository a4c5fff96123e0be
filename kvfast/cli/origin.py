"""``kvfast store push|pull|ls --origin URL`` and ``kvfast store grant``: a store's documents at an S3-compatible
origin, from the shell. Endpoint and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``) or ``--endpoint``."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a command runs: building the parser must not import torch (kvfast --help)
    from kvfast.store import Store, StoreEntry

EXIT_ERROR = 2


def _store(args: argparse.Namespace) -> Store:
    from kvfast.origin import OriginConfig
    from kvfast.store import Store

    return Store(args.root, origin=args.origin, origin_config=OriginConfig(endpoint=args.endpoint))


def _progress(total: int, desc: str, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=quiet, file=sys.stderr)


def _one(entries: list[StoreEntry], prefix: str, where: str) -> StoreEntry | None:
    hits = [e for e in entries if e.key.document.startswith(prefix.lower())]
    if len(hits) != 1 or len(prefix) < 4:
        print(f"kvfast: error: {where}: key {prefix!r} matches {len(hits)} documents; give at least 4 hex digits of "
              "exactly one document key (see `kvfast store ls ROOT --origin URL`)", file=sys.stderr)
        return None
    return hits[0]


def cmd_push(args: argparse.Namespace) -> int:
    store = _store(args)
    entries = store.list(args.model)
    created = 0
    with _progress(sum(e.file_bytes for e in entries), "push", args.json) as bar:
        for e in entries:
            created += store.push(e.key)
            bar.update(e.file_bytes)
    result = {"origin": store.origin.origin.url, "documents": len(entries), "uploaded": created,
              "already_there": len(entries) - created}
    print(json.dumps(result) if args.json else
          f"{created} uploaded, {len(entries) - created} already at {result['origin']}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    store = _store(args)
    remote = store.origin.entries(args.model)
    chosen = remote if not args.keys else [_one(remote, k, store.origin.origin.url) for k in args.keys]
    if any(e is None for e in chosen):
        return EXIT_ERROR
    from kvfast.store import readthrough

    fetched = 0
    with _progress(sum(e.file_bytes for e in chosen), "pull", args.json) as bar:
        for e in chosen:
            fetched += readthrough.fetch(store, e)[1]
            bar.update(e.file_bytes)
    print(json.dumps({"documents": len(chosen), "fetched": fetched}) if args.json else
          f"{fetched} fetched, {len(chosen) - fetched} already in {args.root}")
    return 0


def cmd_ls_origin(args: argparse.Namespace, local_ls: Callable[[argparse.Namespace], int]) -> int:
    if args.origin is None:
        return local_ls(args)
    store = _store(args)
    entries = sorted(store.origin.entries(args.model), key=lambda e: e.key)
    if args.json:
        print(json.dumps([{**e.to_json(), "url": store.origin.url(e.key), "path": None} for e in entries]))
        return 0
    print(f"{'DOCUMENT KEY':<16}  {'MODEL':<22}  {'TOKENS':>8}  {'MB':>9}  {'DTYPE':<8}  HERE")
    for e in entries:
        here = "yes" if e.path.exists() else "no"
        print(f"{e.key.document[:16]:<16}  {e.key.fingerprint[:19] + '...':<22}  {e.num_tokens:>8}  "
              f"{e.file_bytes / 1e6:>9.2f}  {e.dtype:<8}  {here}")
    print(f"{len(entries)} documents at {store.origin.origin.url}, {sum(e.file_bytes for e in entries) / 1e6:.2f} MB")
    return 0


def cmd_grant(args: argparse.Namespace) -> int:
    store = _store(args)
    entry = _one(store.origin.entries(args.model), args.key, store.origin.origin.url)
    if entry is None:
        return EXIT_ERROR
    url = store.grant(entry.key, ttl_s=args.ttl)
    print(json.dumps({"url": url, "document_key": entry.key.document, "fingerprint": entry.key.fingerprint,
                      "ttl_s": args.ttl}) if args.json else url)
    return 0


def add_origin_parsers(ssub: Any) -> None:
    """Add ``push``, ``pull``, ``grant`` and ``ls --origin`` to the ``kvfast store`` subcommands."""

    def common(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--origin", required=required, metavar="URL", help="s3://bucket/prefix of the origin")
        p.add_argument("--endpoint", metavar="URL", help="S3 endpoint (default: AWS_ENDPOINT_URL, else AWS)")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    p = ssub.add_parser("push", help="upload the store's documents to an origin (each created only if absent)",
                        description="Upload every document of ROOT (or of one model) to the origin: the .kvf, then "
                                    "its index entry, each with a conditional create (If-None-Match: *), so a "
                                    "document already there is left as it is.")
    p.add_argument("root", metavar="ROOT", help="the store's folder on this node")
    p.add_argument("--model", metavar="FINGERPRINT", help="only this model's documents")
    common(p)
    p.set_defaults(func=cmd_push)

    p = ssub.add_parser("pull", help="fetch documents from an origin into the store (every chunk checked)",
                        description="Fetch documents from the origin into ROOT's disk tier by ranged GETs; every "
                                    "chunk's CRC-32C is checked before it is written, and the object must agree "
                                    "with its index entry.")
    p.add_argument("root", metavar="ROOT", help="the store's folder on this node")
    p.add_argument("keys", nargs="*", metavar="DOC", help="document keys or unique prefixes (default: all)")
    p.add_argument("--model", metavar="FINGERPRINT", help="the model whose documents to pull")
    common(p)
    p.set_defaults(func=cmd_pull)

    p = ssub.add_parser("grant", help="print a time-limited presigned URL that loads one document",
                        description="Print a presigned HTTPS URL for one document at the origin: its holder can "
                                    "kvfast.load(url, ...) that document, and nothing else, until it expires.")
    p.add_argument("root", metavar="ROOT", help="the store's folder on this node")
    p.add_argument("key", metavar="DOC", help="the document key (or a unique prefix of it)")
    p.add_argument("--ttl", type=int, default=3600, help="seconds the URL stays valid (default 3600)")
    p.add_argument("--model", metavar="FINGERPRINT", help="the model whose document it is")
    common(p)
    p.set_defaults(func=cmd_grant)

    ls = ssub.choices["ls"]  # `ls ROOT` lists the local store; with --origin, the documents at the origin
    ls.add_argument("--origin", metavar="URL", help="list the documents at this origin instead (s3://bucket/prefix)")
    ls.add_argument("--endpoint", metavar="URL", help="S3 endpoint (default: AWS_ENDPOINT_URL, else AWS)")
    local_ls = ls.get_default("func")
    ls.set_defaults(func=lambda args: cmd_ls_origin(args, local_ls))
