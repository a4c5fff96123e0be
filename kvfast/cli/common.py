"""What every ``kvfast`` subcommand shares: exit codes, the one-line error, option types that refuse a bad
value naming it, and reading models and token ids."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

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


def fail(message: str) -> NoReturn:
    raise CliError(message)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (naming the option and value) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- option types: each refuses a bad value naming it and what is allowed ---------------------------------
def int_at_least(low: int, what: str, high: int | None = None) -> Any:
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


positive_int = int_at_least(1, "a whole number >= 1")
non_negative_int = int_at_least(0, "a whole number >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use a number > 0")
    return value


def probability_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use a number in (0, 1]")
    return value


# -- helpers --------------------------------------------------------------------------------------------
def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def read_ids(path: str) -> list[int]:
    """The whitespace-separated integers of ``path``; refuses a missing, unreadable or empty file by name."""
    p = Path(path)
    if p.is_dir():
        fail(f"{path}: is a folder; give a file of whitespace-separated token ids")
    try:
        words = p.read_text().split()
    except FileNotFoundError:
        fail(f"{path}: no such file (expected whitespace-separated token ids)")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{path}: cannot read token ids: {getattr(exc, 'strerror', None) or exc}")
    if not words:
        fail(f"{path}: no token ids (the file is empty); give at least one whitespace-separated integer")
    for i, word in enumerate(words):
        if not word.lstrip("-").isdigit():
            fail(f"{path}: {word[:20]!r} (word {i}) is not a token id; the file must hold whitespace-separated "
                  "integers")
    return [int(w) for w in words]


def check_ids(model: Any, ids: list[int], source: str) -> list[int]:
    """Refuse ids the model has no embedding for, naming where they came from (else: an IndexError deep
    inside the forward)."""
    vocab = model.get_input_embeddings().num_embeddings
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            fail(f"{source}: token id {t} at position {i} is not in the model's vocabulary (allowed: 0..{vocab - 1})")
    return ids


def load_model(model_dir: str, dtype: str) -> Any:
    """The model of a local transformers folder; a folder that is not one is refused by name."""
    p = Path(model_dir)
    if not p.exists():
        fail(f"{model_dir}: no such folder (expected a transformers model folder: config.json + weights)")
    if not p.is_dir():
        fail(f"{model_dir}: is a file, not a model folder (expected config.json + weights)")
    if not (p / "config.json").is_file():
        fail(f"{model_dir}: not a model folder (no config.json; expected config.json + weights)")
    progress_line(f"loading the model from {model_dir}")
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype == "auto" else {"dtype": torch_dtype(dtype)}
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **kwargs).eval()
    except (OSError, ValueError, KeyError) as exc:  # transformers' words for a folder it cannot load
        fail(f"{model_dir}: cannot load a causal LM from this folder: {str(exc).splitlines()[0]}")


def load_tokenizer(model_dir: str) -> Any | None:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 - a model folder without a tokenizer is normal (feed token ids)
        return None


def token_ids_arg(args: argparse.Namespace, model: Any, text_attr: str, ids_attr: str, what: str,
         required: bool = True) -> list[int]:
    """The token ids of the document or prompt: from ``--<ids_attr> FILE`` or text through the tokenizer."""
    option = f"--{ids_attr.replace('_', '-')}"
    if getattr(args, ids_attr):
        return check_ids(model, read_ids(getattr(args, ids_attr)), getattr(args, ids_attr))
    text = getattr(args, text_attr)
    if text is None:
        if required:
            fail(f"give the {what} as text or as {option} FILE")
        return []
    if text_attr == "doc":  # DOC is a text file
        if Path(text).is_dir():
            fail(f"{text}: is a folder; give the document as a text file")
        try:
            text = Path(text).read_text()
        except FileNotFoundError:
            fail(f"{text}: no such file (DOC is a text file; or give {option} FILE)")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"{text}: cannot read the document: {getattr(exc, 'strerror', None) or exc}")
        if not text.strip():
            fail(f"{args.doc}: the document is empty")
    tok = load_tokenizer(args.model_dir)
    if tok is None:
        fail(f"{args.model_dir}: has no tokenizer; pass the {what} as {option} FILE (whitespace-separated token ids)")
    ids = tok(text, add_special_tokens=(text_attr == "doc")).input_ids
    if not ids:
        fail(f"the {what} {text[:40]!r} has no tokens")
    return check_ids(model, ids, f"the {what}")


def progress_line(message: str) -> None:
    """A progress line on stderr (stdout stays the result, for scripts)."""
    print(f"kvfast: {message}", file=sys.stderr, flush=True)


def check_output(path: str, force: bool) -> None:
    """Refuse an output path that is a folder, or an existing file unless ``force``: before any work."""
    p = Path(path)
    if p.is_dir():
        fail(f"{path}: is a folder; give the file to write (e.g. {Path(path) / 'doc.kvf'})")
    if p.exists() and not force:
        fail(f"{path}: exists; pass --force to overwrite it")
    if p.parent.exists() and not p.parent.is_dir():
        fail(f"{p.parent}: is a file, not a folder to write {p.name} into")


def format_rows(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def verify_rows(r: Any) -> list[tuple[str, Any]]:
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
