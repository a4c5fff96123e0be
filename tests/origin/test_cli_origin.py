"""kvfast store push|pull|ls --origin and grant, run as a user runs them (the installed console script)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kvfast
from tests.origin.helpers import FP, assert_loaded, cache_for, document


def kvfast_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = shutil.which("kvfast", path=str(Path(sys.executable).parent)) or "kvfast"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, **env})


def test_push_ls_pull_grant(s3, prefix, tmp_path, monkeypatch):
    keys, values, ids = document(300, seed=31)
    kvf = tmp_path / "doc.kvf"
    kvfast.save_kv(kvf, keys, values, ids, fingerprint=FP)
    env = s3.env(s3.a)
    origin = f"s3://{s3.a.bucket}/{prefix}"
    assert kvfast_cli("store", "put", str(tmp_path / "a"), str(kvf), env=env).returncode == 0

    pushed = kvfast_cli("store", "push", str(tmp_path / "a"), "--origin", origin, "--json", env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout) == {"origin": origin, "documents": 1, "uploaded": 1, "already_there": 0}

    listed = kvfast_cli("store", "ls", str(tmp_path / "b"), "--origin", origin, "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    (doc,) = json.loads(listed.stdout)
    assert doc["num_tokens"] == 300 and doc["url"].startswith(origin)

    pulled = kvfast_cli("store", "pull", str(tmp_path / "b"), doc["document_key"][:8], "--origin", origin, "--json",
                        env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout) == {"documents": 1, "fetched": 1}
    assert [e.num_tokens for e in kvfast.Store(tmp_path / "b").list()] == [300]

    granted = kvfast_cli("store", "grant", str(tmp_path / "a"), doc["document_key"][:8], "--ttl", "60", "--origin",
                         origin, env=env)
    assert granted.returncode == 0, granted.stderr
    url = granted.stdout.strip()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    cache = cache_for()
    assert_loaded(cache, kvfast.load(url, cache, fingerprint=FP), keys, values, 300)


def test_unknown_document_and_unreachable_origin_exit_2(s3, prefix, tmp_path):
    env = s3.env(s3.a)
    bad = kvfast_cli("store", "grant", str(tmp_path / "a"), "abcd", "--origin", f"s3://{s3.a.bucket}/{prefix}",
                     env=env)
    assert bad.returncode == 2 and "matches 0 documents" in bad.stderr
    down = kvfast_cli("store", "ls", str(tmp_path / "a"), "--origin", "s3://kvfast-x/p", "--endpoint",
                      "http://127.0.0.1:9", env=env)
    assert down.returncode == 2 and "s3://kvfast-x/p" in down.stderr
