"""expcode-v1 and -v2 (docs/FORMAT.md §7.1, §7.2): every encoder x every decoder, bit for bit, and hostile bytes.

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

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are first imported (tests/test_kernels.py)

from kvfast.format import codec as codecs  # noqa: E402
from kvfast._backend import native  # noqa: E402
from kvfast.format.codec import CodecError, expcode  # noqa: E402
from kvfast.errors import UnsupportedCodecError  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CONTENTS = ["kv_like", "specials", "constant", "random_bits", "repeated_rows"]
VERSIONS = {"v1": False, "v2": True}  # the codec's version -> whether its chunks list repeated rows
ENCODERS = ["python", "native"]
DECODERS = ["python", "native",
            pytest.param("triton", marks=pytest.mark.skipif(HAS_CUDA, reason="a GPU is present: Triton runs "
                                                                             "compiled (triton-gpu)")),
            pytest.param("triton-gpu", marks=[pytest.mark.gpu,
                                              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")])]
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
    if content == "repeated_rows":  # rows of a few distinct tokens, as layer 0's V over repeated tokens
        distinct = _tensor("specials", dtype, (4, *shape[1:]), seed)
        return distinct[torch.randint(0, 4, (shape[0],), generator=g)]
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


def _encode(encoder: str, k: torch.Tensor, v: torch.Tensor, seg_tokens: int = SEG_TOKENS,
            repeats: bool = True) -> np.ndarray:
    t, heads, head_dim = k.shape
    item = k.element_size()
    if encoder == "python":
        coded = expcode.encode(_bits(k), _bits(v), item, seg_tokens, repeats)
    else:
        if native is None:
            pytest.skip("kvfast._C is not built")
        coded = native.expcode_encode(_bits(k), _bits(v), t, heads, head_dim, item, seg_tokens, 2, repeats=repeats)
    return np.frombuffer(coded, dtype=np.uint8)


def _decode(decoder: str, coded: np.ndarray, shape, dtype, repeats: bool = True) -> torch.Tensor:
    """K and V decoded by ``decoder``, as one ``[2, t, H, D]`` tensor."""
    t, heads, head_dim = shape
    item = dtype.itemsize
    if decoder.startswith("triton"):
        pytest.importorskip("triton")
        from kvfast.kernels import expcode as kernels

        device = "cuda" if decoder == "triton-gpu" else "cpu"
        block_size, num_blocks = 4, -(-t // 4) + 2
        pages = torch.zeros(2, num_blocks, block_size, heads, head_dim, dtype=dtype, device=device)
        slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(1))[:t]
        kernels.decode_paged(coded, pages[0], pages[1], slots.to(device), repeats=repeats)
        return pages.reshape(2, -1, heads, head_dim)[:, slots.to(device)].cpu()
    out = np.zeros(2 * t * heads * head_dim * item, dtype=np.uint8)
    if decoder == "native" and native is None:
        pytest.skip("kvfast._C is not built")
    if decoder == "native":
        native.expcode_decode(coded, out, t, heads, head_dim, item, 2, repeats=repeats)
    else:
        expcode.decode(coded, out, t, heads, head_dim, item, repeats=repeats)
    return torch.from_numpy(out).view(dtype).reshape(2, t, heads, head_dim)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(WORDS[a.element_size()]), b.view(WORDS[b.element_size()]))


# -- round trips -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_encoder_decodes_bit_exactly_with_every_decoder(dtype, content, encoder, decoder, version):
    k, v = _tensor(content, dtype, seed=1), _tensor(content, dtype, seed=2)
    coded = _encode(encoder, k, v, repeats=VERSIONS[version])
    decoded = _decode(decoder, coded, SHAPE, dtype, VERSIONS[version])
    assert _same_bits(decoded[0], k) and _same_bits(decoded[1], v)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("seg_tokens", [1, 5, 13])
@pytest.mark.parametrize("version", VERSIONS)
def test_encoders_write_the_same_bytes(dtype, content, seg_tokens, version):
    k, v = _tensor(content, dtype, seed=3), _tensor(content, dtype, seed=4)
    repeats = VERSIONS[version]
    assert np.array_equal(_encode("python", k, v, seg_tokens, repeats), _encode("native", k, v, seg_tokens, repeats))


def test_v2_lists_each_repeated_row_with_its_first_occurrence():
    """Repeats are found per half and bit for bit: -0.0 is not 0.0, and a repeat points at the first equal row."""
    k = torch.zeros(6, 2, 4, dtype=torch.bfloat16)
    k[1, 0, 0] = -0.0  # differs from row 0 in the sign bit only: not a repeat
    k[3] = k[1]
    k[5] = k[1]
    v = torch.arange(48, dtype=torch.bfloat16).reshape(6, 2, 4)  # no repeats
    lay = expcode.parse_layout(_encode("python", k, v, seg_tokens=2), 6, 2, 4, 2, "test")
    assert lay.repeats[0].tolist() == [[2, 0], [3, 1], [4, 0], [5, 1]] and len(lay.repeats[1]) == 0
    assert lay.kept[0].tolist() == [0, 1] and lay.kept[1].tolist() == list(range(6))
    assert lay.num_segments == 2 * 1 + 2 * 3  # K planes: 2 kept rows in one segment; V planes: 6 rows in three


def test_specials_keep_their_bits():
    """The test data really holds what the round trips claim: NaN payloads, both zeros, infinities, subnormals."""
    t = _tensor("specials", torch.bfloat16).reshape(-1)
    words = t.view(torch.int16)
    assert int(words[1]) == -0x8000 and torch.isinf(t[2]) and torch.isnan(t[4])
    assert {int(words[40]), int(words[41])} == {0x7FC1, 0xFF81 - 0x10000}
    assert ((t[7:40] != 0) & (t[7:40].abs() < torch.finfo(torch.bfloat16).tiny)).any()


@pytest.mark.parametrize("backend", ENCODERS)
@pytest.mark.parametrize("codec", ["expcode-v1", "expcode-v2"])
def test_chunks_that_do_not_shrink_are_stored_verbatim(backend, codec):
    if backend == "native" and native is None:
        pytest.skip("kvfast._C is not built")
    k, v = (_bits(_tensor("random_bits", torch.bfloat16, seed=s)).view(np.uint8).reshape(13, 3, 40) for s in (5, 6))
    stored = codecs.encode_chunk(codec, k, v, 2, backend=backend)
    assert stored == k.tobytes() + v.tobytes()
    kv = _bits(_tensor("kv_like", torch.bfloat16, (64, 2, 64), seed=7)).view(np.uint8).reshape(64, 2, 128)
    assert len(codecs.encode_chunk(codec, kv, kv, 2, backend=backend)) < 2 * kv.nbytes


def test_registry_resolves_aliases_and_refuses_unknown_codecs():
    assert codecs.resolve("lossless") == "expcode-v2" and codecs.resolve("raw") == "raw"
    assert codecs.resolve("expcode-v1") == "expcode-v1"  # files written before v2 still load
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
                          np.frombuffer(native.expcode_encode(plane, plane, 64, 2, 8, 2, 16, 1, repeats=True),
                                        np.uint8))


# -- hostile bytes ---------------------------------------------------------------------------------------
def _coded() -> tuple[np.ndarray, tuple[int, int, int]]:
    """An expcode-v2 chunk with repeated K rows and V rows, and its shape."""
    k, v = _tensor("kv_like", torch.bfloat16, seed=8), _tensor("kv_like", torch.bfloat16, seed=9)
    k[[5, 9]], v[[7, 12]] = k[2].clone(), v[0].clone()
    return _encode("python", k, v), SHAPE


def _u32(x: int) -> np.ndarray:
    return np.frombuffer(np.uint32(x).tobytes(), np.uint8)


def _tamper(kind: str) -> np.ndarray:
    coded, (t, heads, head_dim) = _coded()
    data = coded.copy()
    lay = expcode.parse_layout(coded, t, heads, head_dim, 2, "clean")
    assert [r.tolist() for r in lay.repeats] == [[[5, 2], [9, 2]], [[7, 0], [12, 0]]]
    directory, streams, table = lay.directory, lay.streams, int(lay.table_offsets[0])
    pairs = expcode.HEADER_BYTES + expcode.REPEATS_HEAD_BYTES  # K's (row, source) pairs, then V's
    if kind == "short_header":
        return data[:3]
    if kind == "seg_tokens":
        data[:4] = _u32(0)
    elif kind == "repeat_count":
        data[4:8] = _u32(t)  # a half has at most t - 1 repeats
    elif kind == "repeat_pairs":
        return data[: pairs + 8]  # the header promises four pairs; one follows
    elif kind == "repeat_source_after":
        data[pairs + 4 : pairs + 8] = _u32(5)  # row 5's source is itself
    elif kind == "repeat_source_repeated":
        data[pairs + 12 : pairs + 16] = _u32(5)  # row 9's source is row 5, itself a repeat
    elif kind == "repeat_order":
        data[pairs + 8 : pairs + 12] = _u32(4)  # rows 5 then 4
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
             "repeat_count": "at most 12 per half", "repeat_pairs": "cannot hold the .* repeated-row pairs",
             "repeat_source_after": "repeated K rows are not", "repeat_source_repeated": "not itself repeated",
             "repeat_order": "not increasing",
             "table_span": "not a table",
             "directory": "segment lengths", "long_code": "12", "kraft": "over-subscribed",
             "padding": "segment 0|padding|bits"}


@pytest.mark.parametrize("kind", list(TAMPERING))
@pytest.mark.parametrize("decoder", DECODERS)
def test_inconsistent_bytes_raise_codec_error_naming_the_field(kind, decoder):
    with pytest.raises((CodecError, ValueError), match=TAMPERING[kind]) as info:
        _decode(decoder, _tamper(kind), SHAPE, torch.bfloat16)
    if decoder != "native":  # the binding raises ValueError; kvfast.format.codec.decode_chunk turns it into CodecError
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
            codecs.decode_chunk("expcode-v2", data, out, t, heads, head_dim, 2, backend=backend)
            results.append(out.tobytes())
        except CodecError:
            results.append(None)
    assert results[0] == results[1]
