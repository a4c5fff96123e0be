"""The ``kvfast`` command: parses arguments, calls the public API, prints. No logic of its own."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import kvfast
from kvfast.errors import KvfastError
from kvfast.format import DTYPE_NAMES, DTYPES
from kvfast.hf import DEFAULT_PREFILL_CHUNK
from kvfast.verify import VerifyReport, verify

EXIT_FAILED_CHECK = 1  # verify found a difference
EXIT_ERROR = 2  # bad input: the message says which file and what


# -- helpers --------------------------------------------------------------------------------------------
def _read_ids(path: str) -> list[int]:
    try:
        text = Path(path).read_text()
        return [int(tok) for tok in text.split()]
    except (OSError, ValueError) as exc:
        raise SystemExit(f"kvfast: error: {path}: cannot read token ids (whitespace-separated integers): {exc}")


def _load_model(model_dir: str, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype == "auto" else {"dtype": DTYPES[dtype]}
    if not Path(model_dir).is_dir():
        raise SystemExit(f"kvfast: error: {model_dir}: not a model folder (config.json + weights)")
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **kwargs).eval()


def _tokenizer(model_dir: str) -> Any | None:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 - a model folder without a tokenizer is normal (feed token ids)
        return None


def _ids(args: argparse.Namespace, text_attr: str, ids_attr: str, what: str, required: bool = True) -> list[int]:
    if getattr(args, ids_attr):
        return _read_ids(getattr(args, ids_attr))
    text = getattr(args, text_attr)
    if text is None:
        if required:
            raise SystemExit(f"kvfast: error: give the {what} as text or as --{ids_attr.replace('_', '-')} FILE")
        return []
    if Path(text).is_file() and text_attr == "doc":
        text = Path(text).read_text()
    tok = _tokenizer(args.model_dir)
    if tok is None:
        raise SystemExit(f"kvfast: error: {args.model_dir} has no tokenizer; pass the {what} as "
                         f"--{ids_attr.replace('_', '-')} FILE (whitespace-separated token ids)")
    return tok(text, add_special_tokens=(text_attr == "doc")).input_ids


def _table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _verify_rows(r: VerifyReport) -> list[tuple[str, Any]]:
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
    model = _load_model(args.model_dir, args.dtype)
    ids = _ids(args, "doc", "token_ids", "document")
    t0 = time.perf_counter()
    path = kvfast.publish(model, ids, args.output, chunk_tokens=args.chunk_tokens, prefill_chunk=args.prefill_chunk,
                          progress=True)
    with kvfast.open(path) as r:
        size = r.chunks[-1].offset + r.chunks[-1].length
    print(f"wrote {path}: {len(ids)} tokens, {size / 1e6:.2f} MB, {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    model = _load_model(args.model_dir, args.dtype)
    prompt = _ids(args, "prompt", "prompt_ids", "prompt")
    with kvfast.open(args.kv) as r:
        n = r.num_tokens
        cache = kvfast.PagedKVCache.for_model(model, num_blocks=-(-(n + len(prompt) + args.max_new_tokens) // 16) + 1)
        seq = kvfast.load(r, cache, model=model)
    out = kvfast.generate(model, cache, seq, prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          eos_token_id=getattr(model.config, "eos_token_id", None), return_logits=False)
    tok = _tokenizer(args.model_dir)
    print(tok.decode(out.tokens) if tok is not None else " ".join(map(str, out.tokens)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    model = _load_model(args.model_dir, args.dtype)
    prompt = _ids(args, "prompt", "prompt_ids", "question", required=False)
    if not prompt:  # a question the model knows the tokens of: the document's first tokens again
        with kvfast.open(args.kv) as r:
            prompt = r.token_ids[:8].tolist()
    report = verify(model, args.kv, prompt, max_new_tokens=args.tokens)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"kvfast verify {args.kv}\n{_table(_verify_rows(report))}")
    return 0 if report.ok else EXIT_FAILED_CHECK


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
        return 0
    rows = [("file", info["path"]), ("model", m.fingerprint), ("architecture", m.config.get("architecture", "?")),
            ("tokens", m.num_tokens), ("layers x kv_heads x head_dim", f"{m.num_layers} x {m.num_kv_heads} x {m.head_dim}"),
            ("dtype", DTYPE_NAMES[m.dtype]), ("codec", m.codec),
            ("chunks", f"{info['chunks']} ({m.chunk_tokens} tokens each)"),
            ("KV bytes", f"{info['kv_bytes']:,} ({info['kv_bytes'] / m.num_tokens / 1e6:.4f} MB/token)"),
            ("file bytes", f"{info['file_bytes']:,}"),
            ("checksums", "all chunks OK" if args.verify else "not checked (use --verify)")]
    print(_table(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"kvfast demo: a {args.layers}-layer Llama built locally (random weights, seed 0), a {args.tokens}-token "
          "document; publish -> load -> verify")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).to(DTYPES[args.dtype]).eval()
    gen = torch.Generator().manual_seed(0)
    doc = torch.randint(0, 512, (args.tokens,), generator=gen).tolist()
    question = torch.randint(0, 512, (16,), generator=gen).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.kvf"
        kvfast.publish(model, doc, path, progress=True)
        size = path.stat().st_size
        report = verify(model, path, question, max_new_tokens=32)
    rows = [("file size", f"{size / 1e6:.2f} MB"), *_verify_rows(report)]
    print(_table(rows))
    return 0 if report.ok else EXIT_FAILED_CHECK


# -- parser ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvfast",
        description="Compute a document's prefill once, save its KV cache as a .kvf file, and load it "
                    "bit-exactly into a paged KV cache instead of prefilling again.",
        epilog="Exit codes: 0 ok, 1 a check failed (verify), 2 bad input (the message names the file). "
               "Start with `kvfast demo`.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model_dir", metavar="MODEL_DIR", help="a local transformers model folder")
        sp.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="dtype to run the model in (default: the checkpoint's); the KV has this dtype")

    sp = sub.add_parser("publish", help="prefill a document and write its KV as a .kvf file",
                        description="Prefill DOC with the model and write its KV cache to OUTPUT atomically.")
    model_args(sp)
    sp.add_argument("doc", metavar="DOC", nargs="?", help="a text file (tokenized with the model's tokenizer)")
    sp.add_argument("--token-ids", metavar="FILE", help="the document as whitespace-separated token ids instead")
    sp.add_argument("-o", "--output", required=True, help="the .kvf file to write")
    sp.add_argument("--chunk-tokens", type=int, default=256, help="tokens per stored chunk (default 256)")
    sp.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                    help="tokens per prefill forward (bounds activation memory)")
    sp.set_defaults(func=cmd_publish)

    sp = sub.add_parser("run", help="load a .kvf document and generate after a prompt",
                        description="Load the document's KV into a paged cache and continue it with PROMPT.")
    model_args(sp)
    sp.add_argument("--kv", required=True, help="the .kvf file")
    sp.add_argument("--prompt", help="prompt text (needs the model's tokenizer)")
    sp.add_argument("--prompt-ids", metavar="FILE", help="prompt as whitespace-separated token ids")
    sp.add_argument("--max-new-tokens", type=int, default=32)
    sp.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same tokens)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("verify", help="check a .kvf file is token-exact for a model",
                        description="Load KV and compare it, and a greedy continuation, with a fresh prefill "
                                    "(must be bitwise equal: exit 1 otherwise) and with a one-pass scratch "
                                    "prefill of document+question (reported; may differ by rounding).")
    model_args(sp)
    sp.add_argument("kv", metavar="KV", help="the .kvf file")
    sp.add_argument("--prompt", help="question text (default: the document's first 8 tokens)")
    sp.add_argument("--prompt-ids", metavar="FILE", help="question as whitespace-separated token ids")
    sp.add_argument("--tokens", type=int, default=32, help="greedy tokens to compare (default 32)")
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
    sp.add_argument("--tokens", type=int, default=1000, help="document length (default 1000)")
    sp.add_argument("--layers", type=int, default=4)
    sp.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KvfastError as exc:
        print(f"kvfast: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except FileNotFoundError as exc:
        print(f"kvfast: error: {exc.filename}: no such file", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
