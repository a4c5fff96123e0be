"""``kvfast publish|run|verify|inspect|demo``: one document and one model."""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import kvfast
from kvfast.cli.common import (
    DEFAULT_PREFILL_CHUNK,
    DTYPE_NAMES,
    EXIT_FAILED_CHECK,
    EXIT_OK,
    check_output,
    format_rows,
    int_at_least,
    load_model,
    load_tokenizer,
    non_negative_int,
    positive_float,
    positive_int,
    probability_arg,
    progress_line,
    token_ids_arg,
    torch_dtype,
    verify_rows,
)


# -- subcommands ----------------------------------------------------------------------------------------
def cmd_publish(args: argparse.Namespace) -> int:
    check_output(args.output, args.force)
    model = load_model(args.model_dir, args.dtype)
    ids = token_ids_arg(args, model, "doc", "token_ids", "document")
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
    model = load_model(args.model_dir, args.dtype)
    prompt = token_ids_arg(args, model, "prompt", "prompt_ids", "prompt")
    progress_line(f"loading {args.kv}")
    with kvfast.open(args.kv) as r:
        n = r.num_tokens
        cache = kvfast.PagedKVCache.for_model(model, num_blocks=-(-(n + len(prompt) + args.max_new_tokens) // 16) + 1)
        seq = kvfast.load(r, cache, model=model)
    out = kvfast.generate(model, cache, seq, prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          eos_token_id=getattr(model.config, "eos_token_id", None), return_logits=False,
                          progress=not args.json)
    tok = load_tokenizer(args.model_dir)
    text = tok.decode(out.tokens) if tok is not None else None
    if args.json:
        print(json.dumps({"document_tokens": n, "prompt_tokens": len(prompt), "tokens": out.tokens, "text": text}))
    else:
        print(text if text is not None else " ".join(map(str, out.tokens)))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    model = load_model(args.model_dir, args.dtype)
    prompt = token_ids_arg(args, model, "prompt", "prompt_ids", "question", required=False)
    if not prompt:  # a question the model knows the tokens of: the document's first tokens again
        with kvfast.open(args.kv) as r:
            prompt = r.token_ids[:8].tolist()
    report = kvfast.verify(model, args.kv, prompt, max_new_tokens=args.tokens, progress=not args.json)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"kvfast verify {args.kv}\n{format_rows(verify_rows(report))}")
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
    print(format_rows(rows))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"kvfast demo: a {args.layers}-layer Llama built locally (random weights, seed 0), a {args.tokens}-token "
          "document; publish -> load -> verify")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).to(torch_dtype(args.dtype)).eval()
    gen = torch.Generator().manual_seed(0)
    doc = torch.randint(0, 512, (args.tokens,), generator=gen).tolist()
    question = torch.randint(0, 512, (16,), generator=gen).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.kvf"
        kvfast.publish(model, doc, path, progress=True)
        size = path.stat().st_size
        report = kvfast.verify(model, path, question, max_new_tokens=32)
    rows = [("file size", f"{size / 1e6:.2f} MB"), *verify_rows(report)]
    print(format_rows(rows))
    return EXIT_OK if report.ok else EXIT_FAILED_CHECK




def model_args(sp: argparse.ArgumentParser) -> None:
    """MODEL_DIR and --dtype, as every command that runs a model takes them."""
    sp.add_argument("model_dir", metavar="MODEL_DIR", help="a local transformers model folder (config.json + "
                                                           "weights)")
    sp.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                    help="dtype to run the model in (default: the checkpoint's); the KV has this dtype")


def add_document_parsers(sub: Any) -> None:
    """``publish``, ``run``, ``verify``, ``inspect``, ``demo``: one document, one model."""
    sp = sub.add_parser("publish", help="prefill a document and write its KV as a .kvf file",
                        description="Prefill DOC with the model and write its KV cache to OUTPUT atomically.")
    model_args(sp)
    sp.add_argument("doc", metavar="DOC", nargs="?", help="a text file (tokenized with the model's tokenizer)")
    sp.add_argument("--token-ids", metavar="FILE", help="the document as whitespace-separated token ids instead")
    sp.add_argument("-o", "--output", required=True,
                    help="the .kvf file to write (refused if it exists, unless --force)")
    sp.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    sp.add_argument("--chunk-tokens", type=positive_int, default=256, help="tokens per stored chunk (default 256)")
    sp.add_argument("--prefill-chunk", type=positive_int, default=DEFAULT_PREFILL_CHUNK,
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
    sp.add_argument("--max-new-tokens", type=non_negative_int, default=32,
                    help="tokens to generate at most (default 32)")
    sp.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    sp.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature (default 1.0)")
    sp.add_argument("--top-k", type=non_negative_int, default=0,
                    help="sample among the k likeliest tokens (default 0: all)")
    sp.add_argument("--top-p", type=probability_arg, default=1.0,
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
    sp.add_argument("--tokens", type=positive_int, default=32, help="greedy tokens to compare (default 32)")
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
    sp.add_argument("--tokens", type=int_at_least(1, "a whole number in 1..8192", 8192), default=1000,
                    help="document length (default 1000; at most the demo model's 8192 positions)")
    sp.add_argument("--layers", type=positive_int, default=4, help="decoder layers of the demo model (default 4)")
    sp.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="model and KV dtype (default bfloat16)")
    sp.set_defaults(func=cmd_demo)
