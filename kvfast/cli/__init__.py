"""The ``kvfast`` command: parses arguments, calls the public API, prints. No logic of its own.

Importing this module is cheap: torch, transformers and kvfast's modules are imported inside the command that
needs them, so ``kvfast --help`` and ``kvfast --version`` answer at once.

Exit codes, one meaning each: 0 success; 1 the check ran and failed (``verify`` not exact, ``audit`` failed, the
ledger's chain broken); 2 bad input or usage (the one-line message names the value and what is allowed);
3 an internal error (a bug: the traceback is printed); 130 interrupted (Ctrl-C).

Laid out by command group: common.py (exit codes, errors, option types), document.py, store.py, trust.py,
measure.py; this module builds the parser and runs a command.
"""
from __future__ import annotations

import argparse
import errno
import sys
import traceback

import kvfast
from kvfast.cli.common import EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED, CliError, Parser
from kvfast.cli.document import add_document_parsers
from kvfast.cli.measure import add_bench_parser, add_cost_parser
from kvfast.cli.store import add_store_parser
from kvfast.cli.trust import add_trust_parsers


# -- parser ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``kvfast`` argument parser: every subcommand, every option with its help (imports nothing heavy)."""
    p = Parser(
        prog="kvfast",
        description="Compute a document's prefill once, save its KV cache as a .kvf file, and load it "
                    "bit-exactly into a paged KV cache instead of prefilling again.",
        epilog="Exit codes: 0 ok; 1 a check ran and failed (verify, audit, store ledger --verify); 2 bad input or "
               "usage (the message names the value and what is allowed); 3 internal error (a bug); "
               "130 interrupted. Start with `kvfast demo`.")
    p.add_argument("--version", action="version", version=f"kvfast {kvfast.__version__}",
                   help="print kvfast's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser,
                           help="one of these; `kvfast COMMAND --help` explains it")
    add_document_parsers(sub)
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
