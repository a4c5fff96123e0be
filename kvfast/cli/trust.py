"""``kvfast keygen|sign|audit``: trust across parties."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import kvfast
from kvfast._fs import read_small_file
from kvfast.errors import FileAccessError
from kvfast.cli.common import (
    DTYPE_NAMES,
    EXIT_FAILED_CHECK,
    EXIT_OK,
    fail,
    format_rows,
    load_model,
    non_negative_int,
    positive_int,
    progress_line,
)


# -- kvfast keygen / sign / audit: trust across parties -----------------------------------------------------
def cmd_keygen(args: argparse.Namespace) -> int:
    if Path(args.key).exists():
        fail(f"{args.key}: exists; not overwriting a key (give a new path)")
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
        fail(f"{args.key}: {'is a folder' if Path(args.key).is_dir() else 'no such file'}; give the private key "
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
        try:  # a regular file of at most 64 KiB: a FIFO or /dev/zero given by mistake must not hang or fill memory
            secret = read_small_file(args.secret_file, 64 << 10)[0]
        except FileAccessError as exc:
            fail(f"{exc}; give a file of secret bytes")
    model = load_model(args.model_dir, args.dtype)
    if args.attn:
        model.set_attn_implementation(args.attn)
    options = {} if args.layer0_samples is None else {"layer0_samples": args.layer0_samples}
    progress_line(f"auditing {args.kv}")
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
        print(format_rows(rows))
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
    sp.add_argument("--samples", type=positive_int, default=8,
                    help="positions to recompute at every layer (default 8; at least 1)")
    sp.add_argument("--layer0-samples", type=non_negative_int,
                    help="further positions whose layer 0 alone is recomputed (default: enough that an edit of 1%% "
                         "of positions that touches layer 0 is caught with probability >= 99%%; 0: none)")
    sp.add_argument("--secret-file", metavar="FILE", help="your secret (bytes) to sample positions with "
                                                          "(default: fresh random)")
    sp.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto", help="dtype to run the model in")
    sp.add_argument("--attn", choices=["eager", "sdpa"], help="attention implementation (default: the model's)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=cmd_audit)
