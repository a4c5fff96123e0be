"""What the origin tests share: documents of random KV, stores of 'other machines', a network gate."""
from __future__ import annotations

import threading

import numpy as np
import torch

import kvfast
from kvfast.origin import OriginConfig
from tests.conftest import random_ids, random_kv

FP = "sha256:" + "0123456789abcdef" * 4  # a fingerprint as kvfast.fingerprint spells one
SHAPE = {"num_layers": 3, "num_kv_heads": 2, "head_dim": 64}


def document(n: int = 700, seed: int = 0, layers: int = 3, dtype=torch.bfloat16):
    """(keys, values, token ids) of a random document."""
    keys, values = random_kv(layers, n, SHAPE["num_kv_heads"], SHAPE["head_dim"], dtype, seed=seed)
    return keys, values, random_ids(n, seed=seed)


def cache_for(layers: int = 3, blocks: int = 256, layout: str = "NHD", block_size: int = 16,
              dtype=torch.bfloat16) -> kvfast.PagedKVCache:
    return kvfast.PagedKVCache(num_layers=layers, num_kv_heads=SHAPE["num_kv_heads"], head_dim=SHAPE["head_dim"],
                               num_blocks=blocks, block_size=block_size, dtype=dtype, layout=layout)


def assert_loaded(cache, seq, keys, values, n: int) -> None:
    """The sequence's first ``n`` tokens equal the document's KV, bit for bit, in every layer."""
    for layer in range(len(keys)):
        k, v = cache.gather(seq, layer)
        assert torch.equal(k[:n].view(torch.int16), keys[layer][:n].view(torch.int16)), layer
        assert torch.equal(v[:n].view(torch.int16), values[layer][:n].view(torch.int16)), layer


def config(s3, who) -> OriginConfig:
    return OriginConfig(endpoint=s3.endpoint, region="us-east-1", access_key_id=who.key,
                        secret_access_key=who.secret)


def node(tmp_path, name: str, s3, who, prefix: str, **options) -> kvfast.Store:
    """A store with its own root ("its own machine") over ``who``'s bucket at ``prefix``."""
    return kvfast.Store(tmp_path / name, origin=f"s3://{who.bucket}/{prefix}", origin_config=config(s3, who),
                        **options)


def local_kvf_files(store: kvfast.Store) -> list:
    return [p for p in store.root.rglob("*.kvf")]


class GatedSource:
    """A real origin object whose ranged reads past ``open_until`` bytes wait until the test opens the gate: lets a
    test see what kvfast does while the rest of a document has not arrived. Counts the bytes asked for and
    arrived."""

    def __init__(self, source, open_until: int):
        self.source, self.url, self.size = source, source.url, source.size
        self.open_until = open_until
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.requested = 0  # bytes asked for so far (read or waiting at the gate)
        self.fetched = 0  # bytes that arrived

    def read_into(self, start: int, out: np.ndarray) -> None:
        with self.lock:
            self.requested += len(out)
        if start + len(out) > self.open_until:
            assert self.gate.wait(60), "the test never opened the gate"
        self.source.read_into(start, out)
        with self.lock:
            self.fetched += len(out)
