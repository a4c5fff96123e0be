"""``kvfast store put|ls|rm|stats|gc|ledger``: the provider-side store from the shell."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import kvfast
from kvfast._fs import is_real_dir
from kvfast.cli.common import EXIT_FAILED_CHECK, EXIT_OK, fail, format_rows
from kvfast.errors import InvalidArgumentError, LedgerError


# -- kvfast store: the provider-side store ---------------------------------------------------------------
def _size(text: str) -> int:
    """``"1048576"``, ``"512M"``, ``"8G"`` -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in units else ""
    try:
        value = int(float(text[: len(text) - len(unit)]) * units[unit])
    except (ValueError, OverflowError):
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1048576, 512M, 8G)")
    return value


def _open_store(args: argparse.Namespace, create: bool = False) -> Any:
    """The store at ``args.root``; only ``put`` creates one, every other command refuses a path that is not one
    (instead of leaving an empty store where a typo pointed)."""
    root = Path(args.root)
    if root.exists() and not root.is_dir():
        fail(f"{args.root}: is a file, not a store folder")
    if not create and not (root / "STORE.json").is_file():
        fail(f"{args.root}: not a kvfast store (no STORE.json); `kvfast store put {args.root} doc.kvf` creates one")
    disk = getattr(args, "disk_bytes", None)
    return kvfast.Store(args.root, disk_bytes=disk, trusted_keys=getattr(args, "trusted_key", None))


def cmd_store_put(args: argparse.Namespace) -> int:
    for path in args.kv:  # every file is checked before the store is touched
        if Path(path).is_dir():
            fail(f"{path}: is a folder; give .kvf files")
        if not Path(path).exists():
            fail(f"{path}: no such file")
    store = _open_store(args, create=True)
    results = []
    for path in args.kv:
        before = store.stats().puts
        entry = store.put(path, verify=not args.no_verify)
        stored = store.stats().puts > before
        results.append({"source": str(path), "stored": stored, **entry.to_json()})
        if not args.json:
            print(f"{'stored' if stored else 'already stored'} {entry.key.document}  {entry.num_tokens} tokens  "
                  f"{entry.file_bytes / 1e6:.2f} MB  model {entry.key.fingerprint[:19]}...")
    if args.json:
        print(json.dumps(results))
    return EXIT_OK


def cmd_store_ls(args: argparse.Namespace) -> int:
    entries = _open_store(args).list(args.model)
    if args.json:
        print(json.dumps([e.to_json() for e in entries]))
        return EXIT_OK
    print(f"{'DOCUMENT KEY':<16}  {'MODEL':<22}  {'TOKENS':>8}  {'MB':>9}  {'DTYPE':<8}  LAST USED")
    for e in entries:
        try:
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.path.stat().st_mtime))
        except FileNotFoundError:
            used = "(removed)"
        print(f"{e.key.document[:16]:<16}  {e.key.fingerprint[:19] + '...':<22}  {e.num_tokens:>8}  "
              f"{e.file_bytes / 1e6:>9.2f}  {e.dtype:<8}  {used}")
    print(f"{len(entries)} entries, {sum(e.file_bytes for e in entries) / 1e6:.2f} MB")
    return EXIT_OK


def cmd_store_rm(args: argparse.Namespace) -> int:
    store = _open_store(args)
    entries = store.list(args.model)
    for prefix in args.keys:
        hits = [e for e in entries if e.key.document.startswith(prefix.lower())]
        if len(hits) != 1 or len(prefix) < 4:
            fail(f"{args.root}: key {prefix!r} matches {len(hits)} entries; give at least 4 hex digits of exactly "
                  "one document key (see `kvfast store ls`), or --model")
        store.remove(hits[0].key)
        print(f"removed {hits[0].key.document}")
    return EXIT_OK


def cmd_store_stats(args: argparse.Namespace) -> int:
    store = _open_store(args)
    s, entries = store.stats(), store.list()
    if args.json:
        print(json.dumps(s.to_json()))
        return EXIT_OK
    rows = [("root", args.root), ("block tokens", store.block_tokens), ("entries", s.entries),
            ("models", len({e.key.fingerprint for e in entries})),
            ("tokens stored", f"{sum(e.num_tokens for e in entries):,}"),
            ("disk bytes", f"{s.disk_bytes:,}")]
    print(format_rows(rows))
    return EXIT_OK


def cmd_store_gc(args: argparse.Namespace) -> int:
    report = _open_store(args).gc(verify=args.verify)
    print(json.dumps(report) if args.json else format_rows(list(report.items())))
    return EXIT_OK


def _ledgers(root: Path, tenant: str | None) -> dict[str, kvfast.Ledger]:
    """The store's ledgers by tenant id ("" for the shared one): each tenant's lives in its own folder."""
    from kvfast.store.entry import TENANT_ID_RE, check_tenant_id  # imports torch: not while parsers are built

    if tenant is not None:
        try:
            return {tenant: kvfast.Ledger(root / ".tenants" / check_tenant_id(tenant))}
        except InvalidArgumentError as exc:
            fail(f"--tenant: {exc}")
    out = {"": kvfast.Ledger(root)}
    tenants = root / ".tenants"
    if is_real_dir(tenants):
        with os.scandir(tenants) as it:
            out |= {d.name: kvfast.Ledger(d.path) for d in sorted(it, key=lambda d: d.name)
                    if d.is_dir(follow_symlinks=False) and TENANT_ID_RE.fullmatch(d.name)}
    return out


def cmd_store_ledger(args: argparse.Namespace) -> int:
    if not Path(args.root).is_dir():
        fail(f"{args.root}: no such store folder")
    ledgers, failed, out = _ledgers(Path(args.root), args.tenant), False, {}
    for tenant, ledger in ledgers.items():
        if args.repair:
            try:
                repaired = ledger.repair()
            except LedgerError as exc:
                print(f"not repaired: {exc}")
                failed = True
                continue
            if repaired is not None:
                print(f"{ledger.path}: removed {len(repaired['removed'])} bytes of a torn last record at offset "
                      f"{repaired['offset']} ({repaired['removed'][:60]!r}); recorded as record "
                      f"{repaired['record']['seq']} (tier repair)")
        # a head belongs to one ledger: the shared one, or the one --tenant selects
        report = ledger.verify(expect_head=args.expect_head if args.tenant is not None or not tenant else None)
        failed |= args.verify and not report.ok
        out[tenant] = report
    if args.json:
        shared = out.pop("", None)
        body = shared.to_json() if shared is not None else {}
        print(json.dumps({**body, "tenants": {t: r.to_json() for t, r in out.items()}}))
        return EXIT_FAILED_CHECK if failed else EXIT_OK
    for tenant, report in out.items():
        name = f"tenant {tenant}" if tenant else "shared"
        rows = [("ledger", f"{name} ({ledgers[tenant].path})"), ("records", report.records),
                ("head", f"{report.head['count']} {report.head['hash']}")]
        rows += [(f"tenant {t or '(shared)'}", f"{v['loads']} loads, {v['tokens']:,} tokens, {v['bytes']:,} bytes")
                 for t, v in sorted(report.totals.items())]
        if args.verify:
            rows.append(("chain", "OK" if report.ok else "BROKEN"))
        print(format_rows(rows))
        for problem in report.problems if args.verify else []:
            print(f"  problem: {problem}")
    return EXIT_FAILED_CHECK if failed else EXIT_OK


def add_store_parser(sub: Any) -> None:
    """``kvfast store put|ls|rm|stats|gc|ledger ROOT ...``: manage a provider-side store (kvfast.Store)."""
    sp = sub.add_parser("store", help="manage a provider-side KV store (put, ls, rm, stats, gc, ledger)",
                        description="A content-addressed folder of .kvf documents keyed by (model fingerprint, "
                                    "document key), shared by many processes; see kvfast.Store. `put` creates "
                                    "the store; the other commands refuse a folder that is not one.")
    ssub = sp.add_subparsers(dest="store_command", required=True, metavar="STORE_COMMAND",
                             help="one of these; `kvfast store STORE_COMMAND --help` explains it")

    def root_arg(p: argparse.ArgumentParser, creates: bool = False) -> None:
        p.add_argument("root", metavar="ROOT",
                       help="the store's folder" + (" (created if absent)" if creates else " (made by store put)"))

    p = ssub.add_parser("put", help="publish .kvf files into the store (a stored document is a no-op)",
                        description="Copy .kvf files into the store, check every chunk of the copy, and commit "
                                    "them atomically; a document already stored is left as it is.")
    root_arg(p, creates=True)
    p.add_argument("--trusted-key", metavar="PUB", action="append",
                   help="accept only files signed by this public key (repeatable); each file's KV.sig is checked")
    p.add_argument("kv", metavar="KV", nargs="+", help=".kvf files")
    p.add_argument("--no-verify", action="store_true", help="skip the chunk checksum check of the copy")
    p.add_argument("--json", action="store_true", help="print one JSON list: one object per file")
    p.set_defaults(func=cmd_store_put)

    p = ssub.add_parser("ls", help="list stored documents", description="List the store's documents.")
    root_arg(p)
    p.add_argument("--model", metavar="FINGERPRINT", help="only this model's documents")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=cmd_store_ls)

    p = ssub.add_parser("rm", help="remove stored documents by document key (or a unique prefix of one)",
                        description="Remove documents by key, or by a unique prefix of at least 4 hex digits.")
    root_arg(p)
    p.add_argument("keys", metavar="KEY", nargs="+", help="document keys or unique prefixes (>= 4 hex digits)")
    p.add_argument("--model", metavar="FINGERPRINT", help="only among this model's documents")
    p.set_defaults(func=cmd_store_rm)

    p = ssub.add_parser("stats", help="entries and bytes on disk", description="The store's counts and sizes.")
    root_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (kvfast.StoreStats)")
    p.set_defaults(func=cmd_store_stats)

    p = ssub.add_parser("gc", help="remove leftovers of interrupted publishes, corrupt entries, and LRU entries "
                                   "over a disk budget",
                        description="Remove leftovers of interrupted publishes; with --verify, corrupted entries; "
                                    "with --disk-bytes, least recently used entries over the budget.")
    root_arg(p)
    p.add_argument("--verify", action="store_true", help="also read every entry and drop corrupted ones")
    p.add_argument("--disk-bytes", type=_size, metavar="SIZE", help="disk budget, e.g. 50G (LRU eviction)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_store_gc)

    p = ssub.add_parser("ledger", help="show, verify or repair the usage ledgers (one hash-chained record per load)",
                        description="Print the totals of the store's usage ledgers (ROOT/LEDGER.jsonl, and each "
                                    "tenant's ROOT/.tenants/<id>/LEDGER.jsonl); with --verify, check each hash "
                                    "chain: any record deleted, edited or moved makes it exit 1. Keep the printed "
                                    "head: --expect-head proves later that nothing before it was rewritten. "
                                    "--repair cuts off a torn last record (a crash during an append) and says "
                                    "what it removed.")
    root_arg(p)
    p.add_argument("--verify", action="store_true", help="check the chain and the head; exit 1 if broken")
    p.add_argument("--repair", action="store_true",
                   help="cut off a torn last record after verifying the records before it, and record the repair; "
                        "exit 1 if the records before it do not verify (tampering is never repaired)")
    p.add_argument("--tenant", metavar="TENANT_ID", help="only this tenant's ledger (32 hex digits, Store.tenant_id)")
    p.add_argument("--expect-head", metavar="HASH", help="a head hash printed by an earlier verify (of the shared "
                                                          "ledger, or of the one --tenant selects)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_store_ledger)

    # store push|pull|grant and ls --origin: the S3-compatible origin (kvfast/cli/origin.py)
    from kvfast.cli.origin import add_origin_parsers

    add_origin_parsers(ssub)
