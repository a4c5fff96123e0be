"""The README's promise: every failure of the Python API is a KvfastError that names the file (and the value)."""
from __future__ import annotations

import errno
import os

from pathlib import Path

import pytest
import torch

import kvfast
from tests.conftest import VOCAB, random_ids, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", torch.float32)


@pytest.fixture(scope="module")
def doc(model, tmp_path_factory):
    return kvfast.publish(model, random_ids(100, seed=3), tmp_path_factory.mktemp("doc") / "doc.kvf")


def test_lazy_package_has_no_module_named_like_a_public_function():
    # a submodule named like a public function would replace it once imported (kvfast.verify, .sign, .fingerprint
    # once did): the modules that implement them live under other names
    import kvfast.hf.verify  # noqa: F401
    import kvfast.identity  # noqa: F401
    import kvfast.loader  # noqa: F401
    import kvfast.trust.signing  # noqa: F401

    assert callable(kvfast.verify) and callable(kvfast.sign) and callable(kvfast.fingerprint)
    assert callable(kvfast.load) and callable(kvfast.audit)
    modules = {p.stem for p in Path(kvfast.__file__).parent.iterdir() if p.suffix == ".py" or p.is_dir()}
    assert not modules & set(kvfast.__all__)
    assert set(kvfast.__all__) == set(kvfast._EXPORTS) and set(kvfast.__all__) <= set(dir(kvfast))
    assert all(getattr(kvfast, name) is not None for name in kvfast.__all__)  # every name resolves
    with pytest.raises(AttributeError, match="no_such_name"):
        kvfast.no_such_name  # noqa: B018


@pytest.mark.parametrize("what", ["folder", "missing"])
def test_open_names_the_path(tmp_path, what):
    path = tmp_path if what == "folder" else tmp_path / "missing.kvf"
    with pytest.raises(kvfast.KvfastError, match=str(path)) as info:
        kvfast.open(path)
    assert isinstance(info.value, OSError)
    assert info.value.errno == (errno.EISDIR if what == "folder" else errno.ENOENT)
    assert ("is a folder" if what == "folder" else "no such file") in str(info.value)


def test_load_without_model_or_fingerprint(model, doc):
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=16)
    with pytest.raises(kvfast.KvfastError, match=f"{doc}: kvfast.load needs model= or fingerprint="):
        kvfast.load(doc, cache)


@pytest.mark.parametrize("num_tokens", [0, 101, -5])
def test_load_prefix_beyond_the_file(model, doc, num_tokens):
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=16)
    with pytest.raises(kvfast.KvfastError, match=rf"{doc}: num_tokens={num_tokens} .* use 1\.\.100"):
        kvfast.load(doc, cache, model=model, num_tokens=num_tokens)
    assert cache.num_used_blocks == 0


@pytest.mark.parametrize("bad, position", [(VOCAB, 2), (-1, 1), (10**6, 0)])
def test_publish_refuses_ids_outside_the_vocabulary(model, tmp_path, bad, position):
    ids = [1, 2, 3]
    ids[position] = bad
    out = tmp_path / "doc.kvf"
    with pytest.raises(kvfast.KvfastError, match=rf"{out}: token id {bad} at position {position} .*0\.\.{VOCAB - 1}"):
        kvfast.publish(model, ids, out)
    assert not out.exists()


def test_publish_refuses_empty_and_too_long_documents(model, tmp_path):
    with pytest.raises(kvfast.KvfastError, match="empty"):
        kvfast.publish(model, [], tmp_path / "empty.kvf")
    limit = model.config.max_position_embeddings
    with pytest.raises(kvfast.KvfastError, match=f"position limit \\(max_position_embeddings={limit}\\)"):
        kvfast.publish(model, random_ids(limit + 1), tmp_path / "long.kvf")
    assert os.listdir(tmp_path) == []


def test_generate_and_extend_refuse_ids_outside_the_vocabulary(model, doc):
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=16)
    seq = kvfast.load(doc, cache, model=model)
    with pytest.raises(kvfast.KvfastError, match=f"token id {VOCAB} at position 0"):
        kvfast.generate(model, cache, seq, [VOCAB])
    with pytest.raises(kvfast.KvfastError, match="token id -3 at position 1"):
        kvfast.extend(model, cache, seq, [4, -3])
    assert seq.num_tokens == 100  # nothing was written


def test_save_into_a_folder_or_a_full_disk_names_the_path(model, tmp_path, monkeypatch):
    keys, values = kvfast.capture_kv(model, [1, 2, 3])
    with pytest.raises(kvfast.KvfastError, match=f"{tmp_path}: is a folder"):
        kvfast.save_kv(tmp_path, keys, values, [1, 2, 3], fingerprint="sha256:" + "0" * 64)
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the operating system's answer; kvfast's own code runs for real
    out = tmp_path / "doc.kvf"
    with pytest.raises(kvfast.KvfastError, match=f"{out}: .*no space left on the device.*nothing was written"):
        kvfast.save_kv(out, keys, values, [1, 2, 3], fingerprint="sha256:" + "0" * 64)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert os.listdir(tmp_path) == []
