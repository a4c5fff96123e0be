"""expcode-v1 (docs/FORMAT.md §7.1): every encoder x every decoder, bit for bit, and hostile bytes.

Encoders: the numpy reference and C++ (kvfast._C). Decoders: the numpy reference, C++, and the Triton kernel
(``TRITON_INTERPRET=1`` without a GPU) writing into paged caches. The encoders must produce the same bytes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are first imported (tests/test_kernels.py)

from kvfast import codec as codecs  # noqa: E402
from kvfast._backend import native  # noqa: E402
from kvfast.codec import CodecError, expcode  # noqa: E402
from kvfast.errors import UnsupportedCodecError  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CONTENTS = ["kv_like", "specials", "constant", "random_bits"]
ENCODERS = ["python", "native"]
DECODERS = ["python", "native", "triton"]
WORDS = {2: torch.int16, 4: torch.int32}
SHAPE = (13, 3, 20)  # tokens, heads, head_dim: none a power of two, and 13 tokens leave a short last segment
SEG_TOKENS = 4

needs_native = pytest.mark.skipif(native is None, reason="kvfast._C is not built")


def _tensor(content: str, dtype: torch.dtype, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if content == "kv_like":  # per-channel magnitudes, like keys
        return (torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[-1])).to(dtype)
    if content == "constant":
        return torch.full(shape, -1.25, dtype=dtype)
    words = torch.randint(-(1 << 31), 1 << 31, shape, generator=g, dtype=torch.int64)
    bits = words.to(WORDS[dtype.itemsize]) if dtype.itemsize == 4 else (words & 0xFFFF).to(torch.int32).to(torch.int16)
    t = bits.view(dtype)
    if content == "specials":
        specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -2.5], dtype=dtype)
        flat = t.reshape(-1).clone()
        flat[: len(specials)] = specials
        tiny = torch.finfo(dtype).tiny
        flat[7:40] = torch.linspace(-tiny, tiny, 33).to(dtype)  # subnormals around zero
        words_view = flat.view(WORDS[dtype.itemsize])
        nan_bits = {torch.bfloat16: [0x7FC1, 0xFF81 - 0x10000],
                    torch.float16: [0x7E01, 0xFC01 - 0x10000],
                    torch.float32: [0x7FC00001, 0xFF800001 - (1 << 32)]}[dtype]  # quiet and signalling payloads
        words_view[40] = nan_bits[0]
        words_view[41] = nan_bits[1]
        t = flat.reshape(shape)
    return t


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(WORDS[t.element_size()]).numpy().view({2: np.uint16, 4: np.uint32}[t.element_size()])


def _encode(encoder: str, k: torch.Tensor, v: torch.Tensor, seg_tokens: int = SEG_TOKENS) -> np.ndarray:
    t, heads, head_dim = k.shape
    item = k.element_size()
    if encoder == "python":
        coded = expcode.encode(_bits(k), _bits(v), item, seg_tokens)
    else:
        if native is None:
            pytest.skip("kvfast._C is not built")
        coded = native.expcode_encode(_bits(k), _bits(v), t, heads, head_dim, item, seg_tokens, 2)
    return np.frombuffer(coded, dtype=np.uint8)


def _decode(decoder: str, coded: np.ndarray, shape, dtype) -> torch.Tensor:
    """K and V decoded by ``decoder``, as one ``[2, t, H, D]`` tensor."""
    t, heads, head_dim = shape
    item = dtype.itemsize
    if decoder == "triton":
        pytest.importorskip("triton")
        from kvfast.kernels import expcode as kernels

        block_size, num_blocks = 4, -(-t // 4) + 2
        pages = torch.zeros(2, num_blocks, block_size, heads, head_dim, dtype=dtype)
        slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(1))[:t]
        kernels.decode_paged(coded, pages[0], pages[1], slots)
        return pages.reshape(2, -1, heads, head_dim)[:, slots]
    out = np.zeros(2 * t * heads * head_dim * item, dtype=np.uint8)
    if decoder == "native" and native is None:
        pytest.skip("kvfast._C is not built")
    if decoder == "native":
        native.expcode_decode(coded, out, t, heads, head_dim, item, 2)
    else:
        expcode.decode(coded, out, t, heads, head_dim, item)
    return torch.from_numpy(out).view(dtype).reshape(2, t, heads, head_dim)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(WORDS[a.element_size()]), b.view(WORDS[b.element_size()]))


# -- round trips -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("decoder", DECODERS)
def test_every_encoder_decodes_bit_exactly_with_every_decoder(dtype, content, encoder, decoder):
    k, v = _tensor(content, dtype, seed=1), _tensor(content, dtype, seed=2)
    decoded = _decode(decoder, _encode(encoder, k, v), SHAPE, dtype)
    assert _same_bits(decoded[0], k) and _same_bits(decoded[1], v)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("seg_tokens", [1, 5, 13])
def test_encoders_write_the_same_bytes(dtype, content, seg_tokens):
    k, v = _tensor(content, dtype, seed=3), _tensor(content, dtype, seed=4)
    assert np.array_equal(_encode("python", k, v, seg_tokens), _encode("native", k, v, seg_tokens))


def test_specials_keep_their_bits():
    """The test data really holds what the round trips claim: NaN payloads, both zeros, infinities, subnormals."""
    t = _tensor("specials", torch.bfloat16).reshape(-1)
    words = t.view(torch.int16)
    assert int(words[1]) == -0x8000 and torch.isinf(t[2]) and torch.isnan(t[4])
    assert {int(words[40]), int(words[41])} == {0x7FC1, 0xFF81 - 0x10000}
    assert ((t[7:40] != 0) & (t[7:40].abs() < torch.finfo(torch.bfloat16).tiny)).any()


@pytest.mark.parametrize("backend", ENCODERS)
def test_chunks_that_do_not_shrink_are_stored_verbatim(backend):
    if backend == "native" and native is None:
        pytest.skip("kvfast._C is not built")
    k, v = (_bits(_tensor("random_bits", torch.bfloat16, seed=s)).view(np.uint8).reshape(13, 3, 40) for s in (5, 6))
    stored = codecs.encode_chunk("expcode-v1", k, v, 2, backend=backend)
    assert stored == k.tobytes() + v.tobytes()
    kv = _bits(_tensor("kv_like", torch.bfloat16, (64, 2, 64), seed=7)).view(np.uint8).reshape(64, 2, 128)
    assert len(codecs.encode_chunk("expcode-v1", kv, kv, 2, backend=backend)) < 2 * kv.nbytes


def test_registry_resolves_aliases_and_refuses_unknown_codecs():
    assert codecs.resolve("lossless") == "expcode-v1" and codecs.resolve("raw") == "raw"
    with pytest.raises(UnsupportedCodecError, match="zstd"):
        codecs.resolve("zstd")


# -- canonical Huffman codes -----------------------------------------------------------------------------
def _fibonacci_counts(n: int) -> np.ndarray:
    counts, a, b = np.zeros(256, dtype=np.uint64), 1, 1
    for s in range(n):
        counts[s * 7 % 256], a, b = a, b, a + b
    return counts


@pytest.mark.parametrize("counts", [_fibonacci_counts(30), _fibonacci_counts(2), np.ones(256, dtype=np.uint64)],
                         ids=["fibonacci-30", "two-symbols", "uniform"])
def test_code_lengths_are_limited_and_complete(counts):
    lengths = expcode.code_lengths(counts)
    assert lengths.max() <= expcode.MAX_CODE_BITS
    assert ((lengths > 0) == (counts > 0)).all()
    assert sum(2.0 ** -int(n) for n in lengths if n) == 1.0  # a complete prefix code: no wasted bit pattern


@needs_native
def test_length_limited_codes_agree_across_encoders():
    """30 Fibonacci-weighted symbols need codes longer than 12 bits: both encoders must limit them alike."""
    syms = np.repeat(np.nonzero(_fibonacci_counts(30))[0], 3).astype(np.uint16) << 7  # exponent = symbol
    plane = np.resize(syms, 64 * 2 * 8).reshape(64, 2, 8)
    assert np.array_equal(np.frombuffer(expcode.encode(plane, plane, 2, 16), np.uint8),
                          np.frombuffer(native.expcode_encode(plane, plane, 64, 2, 8, 2, 16, 1), np.uint8))


# -- hostile bytes ---------------------------------------------------------------------------------------
def _coded() -> tuple[np.ndarray, tuple[int, int, int]]:
    k, v = _tensor("kv_like", torch.bfloat16, seed=8), _tensor("kv_like", torch.bfloat16, seed=9)
    return _encode("python", k, v), SHAPE


def _tamper(kind: str) -> np.ndarray:
    coded, (t, heads, head_dim) = _coded()
    data = coded.copy()
    lay = expcode.parse_layout(coded, t, heads, head_dim, 2, "clean")
    directory, streams, table = lay.directory, lay.streams, expcode.HEADER_BYTES
    if kind == "short_header":
        return data[:3]
    if kind == "seg_tokens":
        data[:4] = np.frombuffer(np.uint32(0).tobytes(), np.uint8)
    elif kind == "truncated":
        return data[:-1]
    elif kind == "directory":
        data[directory : directory + 4] = np.frombuffer(np.uint32(0xFFFFFFFF).tobytes(), np.uint8)
    elif kind == "long_code":
        data[table + expcode.TABLE_HEAD_BYTES] = 0xDD  # two code lengths of 13 bits
    elif kind == "kraft":
        data[table + expcode.TABLE_HEAD_BYTES : int(lay.table_offsets[1])] = 0x11  # every symbol a one-bit code
    elif kind == "table_span":
        data[table], data[table + 1] = data[table + 1], data[table]  # first symbol above last
    elif kind == "padding":
        first_len = int(data[directory : directory + 4].view("<u4")[0])
        data[streams + first_len - 1] |= 1  # a set padding bit (or a changed last code)
    return data


TAMPERING = {"short_header": "header", "seg_tokens": "seg_tokens", "truncated": "segment lengths",
             "table_span": "not a table",
             "directory": "segment lengths", "long_code": "12", "kraft": "over-subscribed",
             "padding": "segment 0|padding|bits"}


@pytest.mark.parametrize("kind", list(TAMPERING))
@pytest.mark.parametrize("decoder", DECODERS)
def test_inconsistent_bytes_raise_codec_error_naming_the_field(kind, decoder):
    with pytest.raises((CodecError, ValueError), match=TAMPERING[kind]) as info:
        _decode(decoder, _tamper(kind), SHAPE, torch.bfloat16)
    if decoder != "native":  # the binding raises ValueError; kvfast.codec.decode_chunk turns it into CodecError
        assert info.type is CodecError


@needs_native
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=4),
       cut=st.integers(0, 64))
def test_corrupted_chunks_fail_or_decode_alike_never_crash(flips, cut):
    """Damage anywhere (and truncation): C++ and numpy decoders both raise CodecError, or both decode the same
    bytes (a change the format cannot see without the checksum, e.g. in the raw mantissa bytes); never a crash,
    never a read outside the buffer (the C++ decoder bound-checks every size and stream)."""
    coded, (t, heads, head_dim) = _coded()
    data = coded.copy()
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    data = data[: len(data) - cut] if cut < len(data) else data[:1]
    results = []
    for backend in ("python", "native"):
        out = np.zeros(2 * t * heads * head_dim * 2, dtype=np.uint8)
        try:
            codecs.decode_chunk("expcode-v1", data, out, t, heads, head_dim, 2, backend=backend)
            results.append(out.tobytes())
        except CodecError:
            results.append(None)
    assert results[0] == results[1]
