"""The origin tests' server: one real SeaweedFS (``weed server``) per test session, started here and stopped by its
PID (tests/seaweed.py), or the S3 endpoint named by ``KVFAST_TEST_S3_*`` variables."""
from __future__ import annotations

import pytest

from tests import seaweed


@pytest.fixture(scope="session")
def s3():
    """The running :class:`tests.seaweed.S3Server` (admin and tenants A and B, each with its bucket)."""
    with seaweed.serve() as server:
        yield server


@pytest.fixture
def tenant_a_env(s3, monkeypatch):
    """The AWS environment variables of tenant A, as a kvfast process of that tenant runs with them."""
    for k, v in s3.env(s3.a).items():
        monkeypatch.setenv(k, v)
    return s3.a


@pytest.fixture
def prefix(s3):
    """A fresh key prefix: tests sharing the server never see each other's objects."""
    return s3.new_prefix()
