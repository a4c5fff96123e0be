"""The Triton kernels' address arithmetic is 64-bit wherever a stride is multiplied, checked in their compiled IR.

A stride below 2**31 reaches a Triton kernel as an i32 argument, and ``i32 index * i32 stride`` is computed in 32
bits: it wraps once the product passes 2**31 (``head_idx * head_stride`` in a heads-major source of a few million
tokens). Triton's CPU interpreter computes in int64, so no CPU run of the kernels can show it; the IR can. Each
kernel is compiled to Triton IR for an sm_90 target (no GPU needed) with every integer argument an i32, as on a
GPU for ordinary sizes, and no ``arith.muli`` of 32-bit integers may take a ``*_stride`` argument as an operand.
A deliberately 32-bit kernel checks that the detector finds what it must.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from kvfast.kernels import expcode, paged_kv  # noqa: E402

# %name = op operands : types   (Triton names SSA values after the Python variables)
_DEF = re.compile(r"^\s*(%[\w.#]+) = ([\w.]+) (.*)$")
_VALUE = re.compile(r"%[\w.#]+")
_PASS_THROUGH = ("tt.splat", "tt.broadcast", "tt.expand_dims")  # same value, new shape


def lower(kernel, pointers: dict[str, str], constexprs: dict[str, int]) -> str:
    """``kernel`` lowered to Triton IR (no GPU): pointers typed as given, every other integer argument i32."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    names = kernel.arg_names
    signature = {n: pointers.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    args = [options, backend.get_codegen_implementation(options), backend.get_module_map(), context]
    if "target" in inspect.signature(source.make_ir).parameters:
        args.insert(0, target)
    return str(source.make_ir(*args))


def narrow_stride_products(ir_text: str) -> list[str]:
    """The ``arith.muli`` lines with a 32-bit result that multiply by a ``*_stride`` argument (or its splat)."""
    defs = {}
    for line in ir_text.splitlines():
        m = _DEF.match(line)
        if m:
            defs[m.group(1)] = (m.group(2), line)

    def is_stride(value: str) -> bool:
        if value.endswith("_stride"):  # a function argument keeps its Python name
            return True
        op, line = defs.get(value, ("", ""))
        operands = _VALUE.findall(line.split("=", 1)[1].split(":", 1)[0]) if op in _PASS_THROUGH else []
        return any(is_stride(v) for v in operands)

    found = []
    for op, line in defs.values():
        if op != "arith.muli":
            continue
        operands_part, result_type = line.split("=", 1)[1].rsplit(" loc(", 1)[0].split(":", 1)
        if re.search(r"\bi32\b|xi32>", result_type) and any(is_stride(v) for v in _VALUE.findall(operands_part)):
            found.append(line.strip())
    return found


@triton.jit
def _narrow_kernel(src_ptr, dst_ptr, row_stride, BLOCK: tl.constexpr):
    # What the paged kernels must not do: a 32-bit row index times a 32-bit stride.
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    tl.store(dst_ptr + row * row_stride + cols, tl.load(src_ptr + row * row_stride + cols))


PAGED = {"HEAD_DIM": 128, "BLOCK_H": 8, "BLOCK_D": 128}
KERNELS = {
    "scatter": (paged_kv._scatter_kv_kernel,
                {"src_k_ptr": "*i16", "src_v_ptr": "*i16", "k_cache_ptr": "*i16", "v_cache_ptr": "*i16",
                 "slot_mapping_ptr": "*i64"}, PAGED),
    "gather": (paged_kv._gather_kv_kernel,
               {"k_cache_ptr": "*i16", "v_cache_ptr": "*i16", "block_table_ptr": "*i64", "out_k_ptr": "*i16",
                "out_v_ptr": "*i16"}, PAGED),
    "expcode-decode": (expcode._decode_kernel,
                       {"data_ptr": "*u8", "lut_ptr": "*i32", "seg_start_ptr": "*i64", "seg_bytes_ptr": "*i64",
                        "seg_plane_ptr": "*i64", "seg_row_ptr": "*i64", "seg_count_ptr": "*i64",
                        "status_ptr": "*i64", "k_ptr": "*i16", "v_ptr": "*i16", "kept_ptr": "*i64",
                        "slot_ptr": "*i64"},
                       {"HEAD_DIM": 128, "ITEMSIZE": 2, "MAX_SYMBOLS": 256 * 128, "BLOCK": 32}),
}


SPECS = {"narrow": (_narrow_kernel, {"src_ptr": "*i16", "dst_ptr": "*i16"}, {"BLOCK": 64}), **KERNELS}


def lower_by_name(name: str) -> str:
    return lower(*SPECS[name])


def ttir(name: str) -> str:
    """The kernel ``name`` of SPECS in Triton IR. Another test module may have set TRITON_INTERPRET before the
    kernels were imported, which makes them interpreted functions that cannot be lowered: then a fresh process
    without it lowers them."""
    if type(SPECS[name][0]).__name__ != "InterpretedFunction":
        return lower_by_name(name)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"from tests.test_triton_index_width import lower_by_name; print(lower_by_name({name!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_detector_finds_a_32_bit_stride_product():
    found = narrow_stride_products(ttir("narrow"))
    assert found and all("%row_stride" in line for line in found), found


@pytest.mark.parametrize("name", list(KERNELS))
def test_stride_products_are_64_bit(name):
    assert narrow_stride_products(ttir(name)) == []
