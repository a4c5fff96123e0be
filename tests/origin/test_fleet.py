"""A real fleet in miniature: a multi-process SeaweedFS (master, two volume servers with replication 001, filer,
S3 gateway). A document published through one node loads on another while one volume server is down."""
from __future__ import annotations

import pytest

from tests import seaweed
from tests.origin.helpers import FP, assert_loaded, cache_for, document, node


@pytest.fixture
def fleet():
    f = seaweed.start_fleet()
    yield f
    f.stop()


@pytest.mark.slow
def test_published_on_one_node_loads_on_another_with_a_volume_server_down(fleet, tmp_path):
    keys, values, ids = document(600, seed=41)
    prefix = fleet.new_prefix()
    node(tmp_path, "a", fleet, fleet.a, prefix).put((keys, values), token_ids=ids, fingerprint=FP)
    held = sum(f.stat().st_size for f in (fleet.workdir / "v1").glob("*.dat"))
    assert held > 600 * 3 * 2 * 2 * 64 * 2  # volume1 holds a copy of the document: stopping it matters
    fleet.stop_one("volume1")  # the replica on volume2 serves every read
    b = node(tmp_path, "b", fleet, fleet.a, prefix)
    cache = cache_for()
    seq, n = b.attach(FP, ids + [1], cache)
    assert n == 600 and b.stats().hits["origin"] == 1
    assert_loaded(cache, seq, keys, values, n)
