"""The ``kvfast`` command: parses arguments, calls the public API, prints. No logic of its own.

Importing this module is cheap: torch, transformers and kvfast's modules are imported inside the command that
needs them, so ``kvfast --help`` and ``kvfast --version`` answer at once.

Exit codes, one meaning each: 0 success; 1 the check ran and failed (``verify`` not exact, ``audit`` failed, the
ledger's chain broken); 2 bad input or usage (the one-line message names the value and what is allowed);
3 an internal error (a bug: the traceback is printed); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import kvfast

EXIT_OK = 0
EXIT_FAILED_CHECK = 1  # the check ran and failed: verify not exact, audit failed, ledger broken
EXIT_ERROR = 2  # bad input or usage: the message says which value and what is allowed
EXIT_INTERNAL = 3  # anything else: a bug in kvfast or its stack; the traceback is printed to report it
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the KV dtypes of docs/FORMAT.md
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_PREFILL_CHUNK = 512  # = kvfast.hf.DEFAULT_PREFILL_CHUNK (tests/test_cli.py checks they agree)


class CliError(Exception):
    """A mistake in the command line or its inputs: printed as one ``kvfast: error:`` line, exit 2."""


def _fail(message: str) -> NoReturn:
    raise CliError(message)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (naming the option and value) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- option types: each refuses a bad value naming it and what is allowed ---------------------------------
def _int_at_least(low: int, what: str, high: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


_positive_int = _int_at_least(1, "a whole number >= 1")
_count = _int_at_least(0, "a whole number >= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use a number > 0")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use a number in (0, 1]")
    return value


# -- helpers --------------------------------------------------------------------------------------------
def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _read_ids(path: str) -> list[int]:
    """The whitespace-separated integers of ``path``; refuses a missing, unreadable or empty file by name."""
    p = Path(path)
    if p.is_dir():
        _fail(f"{path}: is a folder; give a file of whitespace-separated token ids")
    try:
        words = p.read_text().split()
    except FileNotFoundError:
        _fail(f"{path}: no such file (expected whitespace-separated token ids)")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{path}: cannot read token ids: {getattr(exc, 'strerror', None) or exc}")
    if not words:
        _fail(f"{path}: no token ids (the file is empty); give at least one whitespace-separated integer")
    for i, word in enumerate(words):
        if not word.lstrip("-").isdigit():
            _fail(f"{path}: {word[:20]!r} (word {i}) is not a token id; the file must hold whitespace-separated "
                  "integers")
    return [int(w) for w in words]


def _check_ids(model: Any, ids: list[int], source: str) -> list[int]:
    """Refuse ids the model has no embedding for, naming where they came from (else: an IndexError deep
    inside the forward)."""
    vocab = model.get_input_embeddings().num_embeddings
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            _fail(f"{source}: token id {t} at position {i} is not in the model's vocabulary (allowed: 0..{vocab - 1})")
    return ids


def _load_model(model_dir: str, dtype: str) -> Any:
    """The model of a local transformers folder; a folder that is not one is refused by name."""
    p = Path(model_dir)
    if not p.exists():
        _fail(f"{model_dir}: no such folder (expected a transformers model folder: config.json + weights)")
    if not p.is_dir():
        _fail(f"{model_dir}: is a file, not a model folder (expected config.json + weights)")
    if not (p / "config.json").is_file():
        _fail(f"{model_dir}: not a model folder (no config.json; expected config.json + weights)")
    _status(f"loading the model from {model_dir}")
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype == "auto" else {"dtype": _dtype(dtype)}
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **kwargs).eval()
    except (OSError, ValueError, KeyError) as exc:  # transformers' words for a folder it cannot load
        _fail(f"{model_dir}: cannot load a causal LM from this folder: {str(exc).splitlines()[0]}")


def _tokenizer(model_dir: str) -> Any | None:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 - a model folder without a tokenizer is normal (feed token ids)
        return None


def _ids(args: argparse.Namespace, model: Any, text_attr: str, ids_attr: str, what: str,
         required: bool = True) -> list[int]:
    """The token ids of the document or prompt: from ``--<ids_attr> FILE`` or text through the tokenizer."""
    option = f"--{ids_attr.replace('_', '-')}"
    if getattr(args, ids_attr):
        return _check_ids(model, _read_ids(getattr(args, ids_attr)), getattr(args, ids_attr))
    text = getattr(args, text_attr)
    if text is None:
        if required:
            _fail(f"give the {what} as text or as {option} FILE")
        return []
    if text_attr == "doc":  # DOC is a text file
        if Path(text).is_dir():
            _fail(f"{text}: is a folder; give the document as a text file")
        try:
            text = Path(text).read_text()
        except FileNotFoundError:
            _fail(f"{text}: no such file (DOC is a text file; or give {option} FILE)")
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"{text}: cannot read the document: {getattr(exc, 'strerror', None) or exc}")
        if not text.strip():
            _fail(f"{args.doc}: the document is empty")
    tok = _tokenizer(args.model_dir)
    if tok is None:
        _fail(f"{args.model_dir}: has no tokenizer; pass the {what} as {option} FILE (whitespace-separated token ids)")
    ids = tok(text, add_special_tokens=(text_attr == "doc")).input_ids
    if not ids:
        _fail(f"the {what} {text[:40]!r} has no tokens")
    return _check_ids(model, ids, f"the {what}")


def _status(message: str) -> None:
    """A progress line on stderr (stdout stays the result, for scripts)."""
    print(f"kvfast: {message}", file=sys.stderr, flush=True)


def _output(path: str, force: bool) -> None:
    """Refuse an output path that is a folder, or an existing file unless ``force``: before any work."""
    p = Path(path)
    if p.is_dir():
        _fail(f"{path}: is a folder; give the file to write (e.g. {Path(path) / 'doc.kvf'})")
    if p.exists() and not force:
        _fail(f"{path}: exists; pass --force to overwrite it")
    if p.parent.exists() and not p.parent.is_dir():
        _fail(f"{p.parent}: is a file, not a folder to write {p.name} into")


def _table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _verify_rows(r: Any) -> list[tuple[str, Any]]:
    n = r.new_tokens
    return [
        ("document tokens", r.doc_tokens),
        ("question tokens", r.prompt_tokens),
        ("KV bitwise equal to fresh prefill", "yes" if r.kv_bitwise_equal else "NO"),
        ("greedy tokens matched vs prefill", f"{r.prefill_tokens_matched}/{n}"),
        ("max |logit diff| vs prefill", f"{r.prefill_max_logit_diff:.3g}"),
        ("greedy tokens matched vs scratch", f"{r.scratch_tokens_matched}/{n}"),
        ("max |logit diff| vs scratch", f"{r.scratch_max_logit_diff:.3g}"),
        ("prefill time", f"{r.prefill_seconds * 1e3:.1f} ms"),
        ("load time", f"{r.load_seconds * 1e3:.1f} ms"),
        ("result", "OK" if r.ok else "FAILED"),
    ]


# -- subcommands ----------------------------------------------------------------------------------------
def cmd_publish(args: argparse.Namespace) -> int:
    _output(args.output, args.force)
    model = _load_model(args.model_dir, args.dtype)
    ids = _ids(args, model, "doc", "token_ids", "document")
    t0 = time.perf_counter()
    path = kvfast.publish(model, ids, args.output, chunk_tokens=args.chunk_tokens, prefill_chunk=args.prefill_chunk,
                          progress=not args.json, codec=args.codec)
    with kvfast.open(path) as r:
        info = {"path": str(path), "tokens": len(ids), "file_bytes": path.stat().st_size,
                "kv_bytes": sum(c.raw_length for c in r.chunks), "codec": r.manifest.codec,
                "fingerprint": r.manifest.fingerprint, "seconds": time.perf_counter() - t0}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {path}: {len(ids)} tokens, {info['file_bytes'] / 1e6:.2f} MB, {info['seconds']:.2f} s")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    model = _load_model(args.model_dir, args.dtype)
    prompt = _ids(args, model, "prompt", "prompt_ids", "prompt")
    _status(f"loading {args.kv}")
    with kvfast.open(args.kv) as r:
        n = r.num_tokens
        cache = kvfast.PagedKVCache.for_model(model, num_blocks=-(-(n + len(prompt) + args.max_new_tokens) // 16) + 1)
        seq = kvfast.load(r, cache, model=model)
    out = kvfast.generate(model, cache, seq, prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          eos_token_id=getattr(model.config, "eos_token_id", None), return_logits=False,
                          progress=not args.json)
    tok = _tokenizer(args.model_dir)
    text = tok.decode(out.tokens) if tok is not None else None
    if args.json:
        print(json.dumps({"document_tokens": n, "prompt_tokens": len(prompt), "tokens": out.tokens, "text": text}))
    else:
        print(text if text is not None else " ".join(map(str, out.tokens)))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    model = _load_model(args.model_dir, args.dtype)
    prompt = _ids(args, model, "prompt", "prompt_ids", "question", required=False)
    if not prompt:  # a question the model knows the tokens of: the document's first tokens again
        with kvfast.open(args.kv) as r:
            prompt = r.token_ids[:8].tolist()
    report = kvfast.verify(model, args.kv, prompt, max_new_tokens=args.tokens, progress=not args.json)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"kvfast verify {args.kv}\n{_table(_verify_rows(report))}")
    return EXIT_OK if report.ok else EXIT_FAILED_CHECK


def cmd_inspect(args: argparse.Namespace) -> int:
    with kvfast.open(args.kv) as r:
        if args.verify:
            r.verify()
        m = r.manifest
        info = {**m.to_json(), "path": str(r.path), "chunks": len(r.chunks),
                "kv_bytes": sum(c.raw_length for c in r.chunks), "file_bytes": r.path.stat().st_size,
                "checksums_verified": bool(args.verify)}
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    rows = [("file", info["path"]), ("model", m.fingerprint), ("architecture", m.config.get("architecture", "?")),
            ("tokens", m.num_tokens),
            ("layers x kv_heads x head_dim", f"{m.num_layers} x {m.num_kv_heads} x {m.head_dim}"),
            ("dtype", str(m.dtype).removeprefix("torch.")), ("codec", m.codec),
            ("chunks", f"{info['chunks']} ({m.chunk_tokens} tokens each)"),
            ("KV bytes", f"{info['kv_bytes']:,} ({info['kv_bytes'] / m.num_tokens / 1e6:.4f} MB/token)"),
            ("file bytes", f"{info['file_bytes']:,}"),
            ("checksums", "all chunks OK" if args.verify else "not checked (use --verify)")]
    print(_table(rows))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"kvfast demo: a {args.layers}-layer Llama built locally (random weights, seed 0), a {args.tokens}-token "
          "document; publish -> load -> verify")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).to(_dtype(args.dtype)).eval()
    gen = torch.Generator().manual_seed(0)
    doc = torch.randint(0, 512, (args.tokens,), generator=gen).tolist()
    question = torch.randint(0, 512, (16,), generator=gen).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.kvf"
        kvfast.publish(model, doc, path, progress=True)
        size = path.stat().st_size
        report = kvfast.verify(model, path, question, max_new_tokens=32)
    rows = [("file size", f"{size / 1e6:.2f} MB"), *_verify_rows(report)]
    print(_table(rows))
    return EXIT_OK if report.ok else EXIT_FAILED_CHECK


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
        _fail(f"{args.root}: is a file, not a store folder")
    if not create and not (root / "STORE.json").is_file():
        _fail(f"{args.root}: not a kvfast store (no STORE.json); `kvfast store put {args.root} doc.kvf` creates one")
    disk = getattr(args, "disk_bytes", None)
    return kvfast.Store(args.root, disk_bytes=disk, trusted_keys=getattr(args, "trusted_key", None))


def cmd_store_put(args: argparse.Namespace) -> int:
    for path in args.kv:  # every file is checked before the store is touched
        if Path(path).is_dir():
            _fail(f"{path}: is a folder; give .kvf files")
        if not Path(path).exists():
            _fail(f"{path}: no such file")
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
            _fail(f"{args.root}: key {prefix!r} matches {len(hits)} entries; give at least 4 hex digits of exactly "
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
    print(_table(rows))
    return EXIT_OK


def cmd_store_gc(args: argparse.Namespace) -> int:
    report = _open_store(args).gc(verify=args.verify)
    print(json.dumps(report) if args.json else _table(list(report.items())))
    return EXIT_OK


def cmd_store_ledger(args: argparse.Namespace) -> int:
    if not Path(args.root).is_dir():
        _fail(f"{args.root}: no such store folder")
    report = kvfast.Ledger(args.root).verify(expect_head=args.expect_head)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        rows = [("records", report.records), ("head", f"{report.head['count']} {report.head['hash']}")]
        rows += [(f"tenant {t or '(shared)'}", f"{v['loads']} loads, {v['tokens']:,} tokens, {v['bytes']:,} bytes")
                 for t, v in sorted(report.totals.items())]
        if args.verify:
            rows.append(("chain", "OK" if report.ok else "BROKEN"))
        print(_table(rows))
        for problem in report.problems if args.verify else []:
            print(f"  problem: {problem}")
    return EXIT_FAILED_CHECK if args.verify and not report.ok else EXIT_OK


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

    p = ssub.add_parser("ledger", help="show or verify the usage ledger (one hash-chained record per load)",
                        description="Print per-tenant totals of the store's usage ledger (ROOT/LEDGER.jsonl); "
                                    "with --verify, check the hash chain: any record deleted, edited or moved "
                                    "makes it exit 1. Keep the printed head: --expect-head proves later that "
                                    "nothing before it was rewritten.")
    root_arg(p)
    p.add_argument("--verify", action="store_true", help="check the chain and the head; exit 1 if broken")
    p.add_argument("--expect-head", metavar="HASH", help="a head hash printed by an earlier verify")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_store_ledger)

    # -- the origin (issue 15): store push|pull|grant, ls --origin; self-contained in kvfast/cli_origin.py ----
    from kvfast.cli_origin import add_origin_parsers

    add_origin_parsers(ssub)


# -- kvfast keygen / sign / audit: trust across parties -----------------------------------------------------
def cmd_keygen(args: argparse.Namespace) -> int:
    if Path(args.key).exists():
        _fail(f"{args.key}: exists; not overwriting a key (give a new path)")
    private, public = kvfast.keygen(args.key)
    from kvfast.trust.signing import key_id, load_public_key

    kid = key_id(load_public_key(public))
    if args.json:
        print(json.dumps({"private": str(private), "public": str(public), "key_id": kid}))
    else:
        print(f"wrote {private} (private, keep it) and {public} (public, give it to consumers); key id {kid}")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    if not Path(args.key).is_file():
        _fail(f"{args.key}: {'is a folder' if Path(args.key).is_dir() else 'no such file'}; give the private key "
              "file from kvfast keygen")
    signed = []
    for path in args.kv:
        out = kvfast.sign(path, args.key)
        signed.append({"path": str(path), "signature": str(out)})
        if not args.json:
            print(f"signed {path} -> {out}")
    if args.json:
        print(json.dumps(signed))
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    secret = None
    if args.secret_file:
        if Path(args.secret_file).is_dir():
            _fail(f"{args.secret_file}: is a folder; give a file of secret bytes")
        secret = Path(args.secret_file).read_bytes()
    model = _load_model(args.model_dir, args.dtype)
    if args.attn:
        model.set_attn_implementation(args.attn)
    options = {} if args.layer0_samples is None else {"layer0_samples": args.layer0_samples}
    _status(f"auditing {args.kv}")
    report = kvfast.audit(model, args.kv, samples=args.samples, secret=secret, **options)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        rows = [("file", report.path), ("tokens", report.num_tokens), ("samples", len(report.positions)),
                ("layer-0 samples", len(report.layer0_positions)),
                ("cost", f"{100 * report.cost_fraction:.3f}% of prefill FLOPs ({report.flops:.3g} FLOPs)"),
                ("failed layers (RMS over samples)", ", ".join(map(str, report.failed_layers)) or "none"),
                *[(f"worst #{i + 1}", f"position {w['position']} layer {w['layer']} {w['kv']}: error "
                   f"{w['error']:.3g} (tolerance {w['tolerance']:.3g})") for i, w in enumerate(report.worst[:3])],
                ("result", "OK" if report.ok else "FAILED: the KV is not what this model computes from its tokens")]
        print(_table(rows))
    return EXIT_OK if report.ok else EXIT_FAILED_CHECK


def add_trust_parsers(sub: Any) -> None:
    """``kvfast keygen``, ``kvfast sign``, ``kvfast audit``: signed artifacts and the audit (kvfast.sign/audit)."""
    sp = sub.add_parser("keygen", help="create an Ed25519 key pair for signing .kvf files",
                        description="Write KEY (private, PKCS#8 PEM, mode 0600) and KEY.pub (public PEM).")
    sp.add_argument("key", metavar="KEY", help="the private key file to create (refused if it exists)")
    sp.add_argument("--json", action="store_true", help="print one JSON object: the two paths and the key id")
    sp.set_defaults(func=cmd_keygen)

    sp = sub.add_parser("sign", help="sign .kvf files (writes KV.sig next to each)",
                        description="Write KV.sig: an Ed25519 signature over the file's statement (token ids hash, "
                                    "model fingerprint, tokenizer, dtype, layout, codec, Merkle root of SHA-256 "
                                    "chunk digests). kvfast.load/Store(trusted_keys=...) refuse anything else.")
    sp.add_argument("kv", metavar="KV", nargs="+", help=".kvf files")
    sp.add_argument("--key", required=True, help="the private key (from kvfast keygen)")
    sp.add_argument("--json", action="store_true", help="print one JSON list: each file and its signature file")
    sp.set_defaults(func=cmd_sign)

    sp = sub.add_parser("audit", help="recompute sampled positions of a .kvf file and compare with its KV",
                        description="Recompute SAMPLES positions (chosen from a secret and the file's Merkle root) "
                                    "in one batched forward against the stored prefix and compare every layer's K/V "
                                    "with the stored ones, within a tolerance calibrated from honest runs; and "
                                    "layer 0 alone at LAYER0_SAMPLES more positions (it needs no prefix, and costs "
                                    "a fraction of a layer). Exit 1 when the KV is not what the model computes from "
                                    "its token ids.")
    sp.add_argument("model_dir", metavar="MODEL_DIR", help="a local transformers model folder (the claimed model)")
    sp.add_argument("kv", metavar="KV", help="the .kvf file")
    sp.add_argument("--samples", type=_positive_int, default=8,
                    help="positions to recompute at every layer (default 8; at least 1)")
    sp.add_argument("--layer0-samples", type=_count,
                    help="further positions whose layer 0 alone is recomputed (default: enough that an edit of 1%% "
                         "of positions that touches layer 0 is caught with probability >= 99%%; 0: none)")
    sp.add_argument("--secret-file", metavar="FILE", help="your secret (bytes) to sample positions with "
                                                          "(default: fresh random)")
    sp.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto", help="dtype to run the model in")
    sp.add_argument("--attn", choices=["eager", "sdpa"], help="attention implementation (default: the model's)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=cmd_audit)


# -- kvfast bench / kvfast cost: prefill vs reuse, measured and modelled ---------------------------------
def _positive_ints(text: str) -> list[int]:
    """``"256,512,1024"`` -> ``[256, 512, 1024]``."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"not a list of positive token counts: {text!r} (use e.g. 256,512,1024)")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from kvfast import bench, configs

    if args.plot:
        try:
            bench.require_matplotlib()
        except ImportError as exc:
            _fail(str(exc))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        msg = "no CUDA device here (torch.cuda.is_available() is False)"
        if args.skip_unavailable:
            print(f"kvfast bench: {msg}; skipped")
            return EXIT_OK
        _fail(f"{msg}; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    _status(f"building {args.model}")
    try:
        model = configs.load_model(args.model, dtype=_dtype(args.dtype), device=device, seed=args.seed)
    except ValueError as exc:
        _fail(str(exc))
    label = configs.named(args.model) or Path(args.model).name
    result = bench.run(model, args.lengths, label=label, question_tokens=args.question_tokens,
                       repeats=args.repeats, prefill_repeats=args.prefill_repeats, prefill_chunk=args.prefill_chunk,
                       cold=not args.no_cold, seed=args.seed, workdir=args.workdir, progress=not args.no_progress)
    payload = result.to_json()
    if args.save:
        Path(args.save).write_text(json.dumps(payload, indent=1) + "\n")
    if args.plot:
        bench.plot(result, args.plot)
    print(json.dumps(payload) if args.json else bench.format_table(result))
    return EXIT_OK


def add_bench_parser(sub: Any) -> None:
    """``kvfast bench MODEL --lengths ...``: measure prefill vs load+attach (kvfast.bench)."""
    sp = sub.add_parser("bench", help="measure prefill vs loading the .kvf, by document length",
                        description="For each length: the model's prefill of a random document, kvfast.load of "
                                    "its .kvf into a paged cache (page cache hot and dropped), the first-token "
                                    "latency of a question both ways, the ratio and the KV bytes. MODEL is a model "
                                    "folder (trained weights, or random ones from its config.json) or a named "
                                    "config (qwen3-0.6b, qwen3-4b) built with fixed-seed random weights.")
    sp.add_argument("model", metavar="MODEL_DIR_OR_CONFIG", help="model folder, config.json, or qwen3-0.6b / qwen3-4b")
    sp.add_argument("--lengths", type=_positive_ints, default=[256, 512, 1024, 2048, 4096],
                    help="document lengths in tokens (default 256,512,1024,2048,4096)")
    sp.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model and cache live")
    sp.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="model and KV dtype (default bfloat16)")
    sp.add_argument("--question-tokens", type=_positive_int, default=16,
                    help="question length for first-token latency (default 16)")
    sp.add_argument("--repeats", type=_positive_int, default=3, help="timed runs of each load (best taken; default 3)")
    sp.add_argument("--prefill-repeats", type=_positive_int, default=2,
                    help="timed runs of each prefill (best taken; default 2)")
    sp.add_argument("--prefill-chunk", type=_positive_int, default=DEFAULT_PREFILL_CHUNK,
                    help=f"tokens per prefill forward (default {DEFAULT_PREFILL_CHUNK})")
    sp.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's)")
    sp.add_argument("--seed", type=int, default=0, help="seed of random weights and token ids")
    sp.add_argument("--no-cold", action="store_true", help="skip the loads with the file dropped from the page cache")
    sp.add_argument("--workdir", metavar="DIR", help="where the temporary .kvf files go (default: the temp dir)")
    sp.add_argument("--plot", metavar="PNG", help="draw time vs length and the ratio (needs matplotlib)")
    sp.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    sp.add_argument("--save", metavar="JSON", help="also write the JSON result to this file")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--skip-unavailable", action="store_true",
                    help="exit 0 with a message when --device cuda has no device (for bench/gpu_check.sh)")
    sp.set_defaults(func=cmd_bench)


def _dollars(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"${x / 1e6:,.2f}M"
    if x >= 100:
        return f"${x:,.0f}"
    return f"${x:.3g}"


def _times(x: float | None) -> str:
    return "never" if x is None or x == float("inf") else f"{x:.3g}"


def _cost_rows(r: Any) -> list[tuple[str, Any]]:
    hw = r.hardware
    ms = lambda s: "-" if s is None else f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"  # noqa: E731
    rows = [
        ("source", r.source),
        ("hardware", f"{hw['name']}: {hw['peak_flops'] / 1e12:g} TFLOP/s x mfu {hw['mfu']:g}, "
                     f"{hw['memory_bytes_per_s'] / 1e12:g} TB/s memory, {hw['link_bytes_per_s'] / 1e9:g} GB/s link, "
                     f"${hw['dollars_per_hour']:g}/h"),
        ("KV bytes per token", f"{r.kv_bytes_per_token:,} B ({r.kv_bytes_per_token / 1e6:.4f} MB)"),
        ("KV bytes of the document", f"{r.kv_bytes:,} B ({r.kv_bytes / 1e9:.3f} GB)"),
        ("weight bytes per forward", f"{r.weight_bytes / 1e9:.2f} GB"),
        ("FLOPs: prefill doc + question", f"{r.prefill_flops / 1e12:.3f} TFLOP"),
        ("FLOPs: question after the doc", f"{r.question_flops / 1e12:.4f} TFLOP ({r.flops_ratio:.0f}x fewer)"),
        ("per agent: prefill", f"{ms(r.prefill_s)}  {_dollars(r.prefill_dollars)}"),
        ("per agent: load over the link", ms(r.load_s)),
        ("per agent: reuse (load + question)", f"{ms(r.reuse_s)}  {_dollars(r.reuse_dollars)}  "
                                               f"({r.saving:.3g}x cheaper)"),
        ("per agent: reuse, KV resident", f"{ms(r.reuse_resident_s)}  {_dollars(r.reuse_resident_dollars)}"
                                          + (f"  ({r.prefill_s / r.reuse_resident_s:.3g}x cheaper)"
                                             if r.reuse_resident_s else "")),
        ("per node: first fetch from origin", f"{ms(r.origin_fetch_s)} at {r.origin_bytes_per_s / 1e9:g} GB/s "
                                              f"= {r.origin_fetch_vs_prefill:.3g}x a prefill (once per node)"),
        ("per agent: egress of the KV", f"{_dollars(r.egress_dollars)} at ${r.egress_dollars_per_gb:g}/GB "
                                        f"= {r.egress_vs_prefill:.3g}x the prefill it saves"),
        ("break-even, hosted (loads)", _times(r.break_even_reuses)),
        ("break-even, shipped (loads)", _times(r.break_even_shipped)),
        (f"{r.agents:,.0f} agents: re-prefill", _dollars(r.total_reprefill_dollars)),
        (f"{r.agents:,.0f} agents: reuse, hosted", f"{_dollars(r.total_reuse_dollars)}  "
                                                   f"({r.total_reprefill_dollars / r.total_reuse_dollars:.3g}x less)"),
        (f"{r.agents:,.0f} agents: reuse, shipped", _dollars(r.total_shipped_dollars)),
        (f"tariff headroom ({r.cache_read_fraction:g}x cache read)", f"{r.tariff_headroom:.3g}x"
         + (f" (KV resident: {r.tariff_headroom_resident:.3g}x)" if r.tariff_headroom_resident else "")),
    ]
    return rows + [("note", n) for n in r.notes]


def cmd_cost(args: argparse.Namespace) -> int:
    from kvfast import configs, cost

    try:
        config = configs.get_config(args.model)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    shape = cost.ModelShape.from_config(config, name=configs.named(args.model) or Path(args.model).name)
    hw = cost.with_price(cost.HARDWARE[args.gpu], args.gpu_dollars_per_hour, args.mfu,
                         args.link_gb_per_s * 1e9 if args.link_gb_per_s else None)
    measured = None
    if args.measured:
        try:
            measured = cost.measured_times(json.loads(Path(args.measured).read_text()), args.tokens)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            _fail(f"{args.measured}: not a usable kvfast bench --json result: {exc}")
        if measured.label != shape.name:  # another model's seconds would be priced as this one's
            _fail(f"{args.measured}: measured on {measured.label or 'an unnamed model'}, not --model {args.model}; "
                  f"price it with --model {measured.label or '...'} or run kvfast bench {args.model}")
    report = cost.estimate(shape, args.tokens, agents=args.agents, hardware=hw, dtype_bytes=DTYPE_BYTES[args.dtype],
                           question_tokens=args.question_tokens, chunk=args.prefill_chunk,
                           egress_dollars_per_gb=args.egress_dollars_per_gb,
                           cache_read_fraction=args.cache_read_fraction, batch=args.batch, measured=measured,
                           origin_bytes_per_s=args.origin_gb_per_s * 1e9)
    if args.json:
        print(json.dumps(report.to_json()))
        return EXIT_OK
    print(f"kvfast cost: {shape.name}, {args.tokens}-token document, {args.question_tokens}-token question, "
          f"{DTYPE_BYTES[args.dtype]}-byte KV\n{_table(_cost_rows(report))}")
    return EXIT_OK


def add_cost_parser(sub: Any) -> None:
    """``kvfast cost --model M --tokens N --agents A``: prefill vs reuse in FLOPs, bytes and dollars (kvfast.cost)."""
    from kvfast.cost import (DEFAULT_CACHE_READ_FRACTION, DEFAULT_EGRESS_DOLLARS_PER_GB,  # torch-free
                             DEFAULT_ORIGIN_BYTES_PER_S, HARDWARE)

    sp = sub.add_parser("cost", help="model prefill vs reuse: FLOPs, KV bytes, dollars, break-even",
                        description="From first principles (a roofline over the model's matmul FLOPs and bytes) "
                                    "or from a kvfast bench result (--measured): KV bytes per token, prefill FLOPs, "
                                    "the reuse's cost, egress vs prefill per load, break-even reuse count, the "
                                    "total for N agents, and the headroom of a 0.1x cache-read tariff.")
    sp.add_argument("--model", required=True, help="named config (qwen3-0.6b, qwen3-4b), model folder or config.json")
    sp.add_argument("--tokens", type=_positive_int, required=True, help="document tokens (>= 1)")
    sp.add_argument("--agents", type=_positive_float, default=1.0, help="agents reading the document (e.g. 80e6)")
    sp.add_argument("--question-tokens", type=_positive_int, default=16, help="question tokens (default 16)")
    sp.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="KV and weight dtype (default bfloat16)")
    sp.add_argument("--gpu", choices=sorted(HARDWARE), default="h100", help="hardware preset (default h100)")
    sp.add_argument("--gpu-dollars-per-hour", type=_positive_float, help="price of the accelerator (default $2.00/h)")
    sp.add_argument("--egress-dollars-per-gb", type=_positive_float, default=DEFAULT_EGRESS_DOLLARS_PER_GB,
                    help=f"internet egress price (default ${DEFAULT_EGRESS_DOLLARS_PER_GB}/GB)")
    sp.add_argument("--mfu", type=_probability, help="fraction of peak FLOP/s a prefill achieves (default 0.5)")
    sp.add_argument("--link-gb-per-s", type=_positive_float, help="host->device bandwidth of a KV load, GB/s")
    sp.add_argument("--batch", type=_positive_int, default=1,
                    help="agents sharing each read of the weights (default 1)")
    sp.add_argument("--cache-read-fraction", type=_probability, default=DEFAULT_CACHE_READ_FRACTION,
                    help="cache-read price as a fraction of the input price (default 0.1)")
    sp.add_argument("--prefill-chunk", type=_positive_int, default=DEFAULT_PREFILL_CHUNK,
                    help=f"tokens per prefill forward (default {DEFAULT_PREFILL_CHUNK})")
    sp.add_argument("--measured", metavar="BENCH_JSON",
                    help="use the seconds of a kvfast bench --json result (of the same --model)")
    sp.add_argument("--origin-gb-per-s", type=float, default=DEFAULT_ORIGIN_BYTES_PER_S / 1e9,
                    help="a node's bandwidth from the S3-compatible origin, GB/s (default "
                         f"{DEFAULT_ORIGIN_BYTES_PER_S / 1e9:g}): the per-node read-through row")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=cmd_cost)


# -- parser ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``kvfast`` argument parser: every subcommand, every option with its help (imports nothing heavy)."""
    p = _Parser(
        prog="kvfast",
        description="Compute a document's prefill once, save its KV cache as a .kvf file, and load it "
                    "bit-exactly into a paged KV cache instead of prefilling again.",
        epilog="Exit codes: 0 ok; 1 a check ran and failed (verify, audit, store ledger --verify); 2 bad input or "
               "usage (the message names the value and what is allowed); 3 internal error (a bug); "
               "130 interrupted. Start with `kvfast demo`.")
    p.add_argument("--version", action="version", version=f"kvfast {kvfast.__version__}",
                   help="print kvfast's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser,
                           help="one of these; `kvfast COMMAND --help` explains it")

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model_dir", metavar="MODEL_DIR", help="a local transformers model folder (config.json + "
                                                               "weights)")
        sp.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                        help="dtype to run the model in (default: the checkpoint's); the KV has this dtype")

    sp = sub.add_parser("publish", help="prefill a document and write its KV as a .kvf file",
                        description="Prefill DOC with the model and write its KV cache to OUTPUT atomically.")
    model_args(sp)
    sp.add_argument("doc", metavar="DOC", nargs="?", help="a text file (tokenized with the model's tokenizer)")
    sp.add_argument("--token-ids", metavar="FILE", help="the document as whitespace-separated token ids instead")
    sp.add_argument("-o", "--output", required=True,
                    help="the .kvf file to write (refused if it exists, unless --force)")
    sp.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    sp.add_argument("--chunk-tokens", type=_positive_int, default=256, help="tokens per stored chunk (default 256)")
    sp.add_argument("--prefill-chunk", type=_positive_int, default=DEFAULT_PREFILL_CHUNK,
                    help=f"tokens per prefill forward (bounds activation memory; default {DEFAULT_PREFILL_CHUNK})")
    sp.add_argument("--codec", default="raw", choices=["raw", "lossless", "expcode-v2", "expcode-v1"],
                    help="how chunks are stored: raw (default) or lossless (= expcode-v2: exponents entropy-coded, "
                         "rows that repeat stored once; about 1.5x smaller for bf16 KV, loads bit-exactly; "
                         "expcode-v1 for readers older than v2)")
    sp.add_argument("--json", action="store_true", help="print one JSON object (path, tokens, bytes, fingerprint)")
    sp.set_defaults(func=cmd_publish)

    sp = sub.add_parser("run", help="load a .kvf document and generate after a prompt",
                        description="Load the document's KV into a paged cache and continue it with PROMPT.")
    model_args(sp)
    sp.add_argument("--kv", required=True, help="the .kvf file")
    sp.add_argument("--prompt", help="prompt text (needs the model's tokenizer)")
    sp.add_argument("--prompt-ids", metavar="FILE", help="prompt as whitespace-separated token ids")
    sp.add_argument("--max-new-tokens", type=_count, default=32, help="tokens to generate at most (default 32)")
    sp.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    sp.add_argument("--temperature", type=_positive_float, default=1.0, help="sampling temperature (default 1.0)")
    sp.add_argument("--top-k", type=_count, default=0, help="sample among the k likeliest tokens (default 0: all)")
    sp.add_argument("--top-p", type=_probability, default=1.0,
                    help="sample among the likeliest tokens whose mass reaches p (default 1.0: all)")
    sp.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same tokens)")
    sp.add_argument("--json", action="store_true", help="print one JSON object (the new token ids and their text)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("verify", help="check a .kvf file is token-exact for a model",
                        description="Load KV and compare it, and a greedy continuation, with a fresh prefill "
                                    "(must be bitwise equal: exit 1 otherwise) and with a one-pass scratch "
                                    "prefill of document+question (reported; may differ by rounding).")
    model_args(sp)
    sp.add_argument("kv", metavar="KV", help="the .kvf file")
    sp.add_argument("--prompt", help="question text (default: the document's first 8 tokens)")
    sp.add_argument("--prompt-ids", metavar="FILE", help="question as whitespace-separated token ids")
    sp.add_argument("--tokens", type=_positive_int, default=32, help="greedy tokens to compare (default 32)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("inspect", help="print a .kvf file's manifest",
                        description="Validate a .kvf file's header and layout and print what it holds.")
    sp.add_argument("kv", metavar="KV", help="the .kvf file")
    sp.add_argument("--verify", action="store_true", help="also read every chunk and check its checksum")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("demo", help="publish, load and verify on a model built locally (no download)",
                        description="Build a small Llama with random weights (seed 0), publish a document, "
                                    "load it and verify token-exactness; prints a table.")
    sp.add_argument("--tokens", type=_int_at_least(1, "a whole number in 1..8192", 8192), default=1000,
                    help="document length (default 1000; at most the demo model's 8192 positions)")
    sp.add_argument("--layers", type=_positive_int, default=4, help="decoder layers of the demo model (default 4)")
    sp.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="model and KV dtype (default bfloat16)")
    sp.set_defaults(func=cmd_demo)
    add_store_parser(sub)
    add_trust_parsers(sub)
    add_bench_parser(sub)
    add_cost_parser(sub)
    return p


def _os_error(exc: OSError) -> str:
    """An OSError as one line naming the path (full disk and folders said plainly)."""
    path = exc.filename if exc.filename is not None else "(no path)"
    if exc.errno == errno.ENOSPC:
        return f"no space left writing {path}"
    what = {errno.ENOENT: "no such file or folder", errno.EISDIR: "is a folder, expected a file",
            errno.ENOTDIR: "a parent of this path is a file, not a folder", errno.EEXIST: "exists",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(exc.errno)
    return f"{path}: {what or exc.strerror or exc}"


def main(argv: list[str] | None = None) -> int:
    """Run ``kvfast`` with ``argv`` (default: the process's) and return its exit code."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        # files are written atomically (a temporary renamed at the end), so an interrupt leaves none behind
        print("\nkvfast: interrupted; no file was left half-written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CliError, kvfast.KvfastError) as exc:
        print(f"kvfast: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"kvfast: error: {_os_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception:  # noqa: BLE001 - not the input's fault: keep 1 meaning "the check failed"
        traceback.print_exc()
        print("kvfast: internal error (a bug in kvfast or its stack; please report the traceback above)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
