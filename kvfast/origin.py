"""The origin: any S3-compatible object store (AWS S3, R2, GCS's S3 API, MinIO, Ceph RGW, SeaweedFS), or one
presigned HTTPS link, seen as objects read by byte ranges.

    Origin("s3://bucket/prefix")        credentials and endpoint: explicit arguments, else the standard AWS
                                        variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
                                        AWS_REGION) as the client reads them
    RangeSource                         one object: its size and ranged reads into caller-owned buffers
    open_source("s3://b/k" | "https://...presigned...")

The S3 client is ``obstore`` (Rust, the network wait runs without the GIL), chosen by measurement against
``boto3`` with ``readinto`` (bench/bench_origin_client.py, bench/RESULTS.md "Origin"). A presigned link is read
with the standard library's ``http.client``: the link is the whole credential, no client configuration applies.
Every failure becomes :class:`kvfast.errors.OriginError` naming the URL, within a bounded time.
"""
from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol
from urllib.parse import urlsplit

import numpy as np

from kvfast.errors import OriginError

CONNECT_TIMEOUT_S = 5  # an unreachable origin fails an attach within this (vLLM then recomputes)
REQUEST_TIMEOUT_S = 60  # one ranged GET of at most RANGE_BYTES; a server that stops answering fails the load
MAX_RETRIES = 2


def _obstore():
    try:
        import obstore
    except ImportError:  # pragma: no cover - obstore is a dependency; a stripped install gets a clear message
        raise OriginError("an s3:// origin needs the `obstore` package: pip install obstore") from None
    return obstore


@dataclass(frozen=True)
class OriginConfig:
    """Where an origin is and who we are there. Fields left None come from the standard AWS environment
    variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``)."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None


class Origin:
    """A bucket and key prefix of an S3-compatible store: immutable objects, conditional creates, ranged reads.

    Args:
        url: ``s3://bucket/prefix`` (the prefix may be empty).
        config: endpoint and credentials (None: the AWS environment variables).

    Example:
        >>> origin = Origin("s3://kv-tenant-a/prod")                   # doctest: +SKIP
        >>> origin.put_if_absent("doc.kvf", "/tmp/doc.kvf")            # doctest: +SKIP
        True
    """

    def __init__(self, url: str, config: OriginConfig | None = None):
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"origin must be an s3://bucket/prefix URL, got {url!r}")
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.config = config or OriginConfig()
        self._store = self._make_store()

    def _make_store(self):
        obstore = _obstore()
        from obstore.store import S3Store

        c, env = self.config, os.environ
        endpoint = c.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        kwargs = {"region": c.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"}
        if endpoint:
            kwargs["endpoint"] = endpoint
        if c.access_key_id:
            kwargs["access_key_id"] = c.access_key_id
        if c.secret_access_key:
            kwargs["secret_access_key"] = c.secret_access_key
        del obstore
        return S3Store(self.bucket, **kwargs,
                       client_options={"allow_http": bool(endpoint and endpoint.startswith("http://")),
                                       "connect_timeout": f"{CONNECT_TIMEOUT_S}s", "timeout": f"{REQUEST_TIMEOUT_S}s"},
                       retry_config={"max_retries": MAX_RETRIES, "backoff": {"init_backoff": timedelta(
                           milliseconds=100), "max_backoff": timedelta(seconds=1), "base": 2},
                                     "retry_timeout": timedelta(seconds=2 * CONNECT_TIMEOUT_S)})

    def __repr__(self) -> str:
        return f"Origin({self.url!r})"

    def key(self, name: str) -> str:
        """The object key of ``name`` under this origin's prefix."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def url_of(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    # -- calls, each mapped to OriginError ------------------------------------------------------------------
    def _call(self, what: str, name: str, fn, passthrough: tuple[type[BaseException], ...] = ()):
        """``fn(obstore)``; the client's errors become :class:`OriginError` naming the object, except "not found"
        and ``passthrough``, which the caller decides on."""
        obstore = _obstore()
        try:
            return fn(obstore)
        except (obstore.exceptions.NotFoundError, *passthrough):
            raise
        except obstore.exceptions.BaseError as exc:
            raise OriginError(f"{what} failed: {_short(exc)}", path=self.url_of(name)) from None
        except OSError as exc:
            raise OriginError(f"{what} failed: {exc}", path=self.url_of(name)) from None

    def put_if_absent(self, name: str, data: bytes | str | os.PathLike) -> bool:
        """Create the object ``name`` from bytes or a file, only if it does not exist (``If-None-Match: *``): a
        single PUT, so the object is either absent or whole. Returns False when it already existed."""
        obstore = _obstore()
        body = os.fspath(data) if isinstance(data, os.PathLike) else data
        if isinstance(body, str):
            with open(body, "rb") as f:
                body = f.read()
        for attempt in range(3):
            try:
                self._call("conditional PUT", name,
                           lambda o: o.put(self._store, self.key(name), body, mode="create", use_multipart=False),
                           passthrough=(obstore.exceptions.AlreadyExistsError, obstore.exceptions.PreconditionError,
                                        obstore.exceptions.PermissionDeniedError,
                                        obstore.exceptions.UnauthenticatedError))
            except (obstore.exceptions.AlreadyExistsError, obstore.exceptions.PreconditionError):
                return False
            except (obstore.exceptions.PermissionDeniedError, obstore.exceptions.UnauthenticatedError) as exc:
                # refused: these keys may not write here, whether or not the object exists
                raise OriginError(f"conditional PUT failed: {_short(exc)}", path=self.url_of(name)) from None
            except OriginError as exc:
                # An S3 412 the client did not type. Its words, never its number: the message holds the key, and
                # hex digits can spell "412".
                if "PreconditionFailed" in exc.detail or "Precondition Failed" in exc.detail:
                    return False
                # A concurrent conditional write may be answered 409 (ConditionalRequestConflict) or the reply
                # lost: the object's presence decides, as the PUT is all or nothing.
                if self.size(name) is not None:
                    return False
                if attempt == 2:
                    raise
                continue
            return True
        raise AssertionError("unreachable")

    def get(self, name: str) -> bytes | None:
        """The whole (small) object, or None when absent."""
        obstore = _obstore()
        try:
            return bytes(self._call("GET", name, lambda o: o.get(self._store, self.key(name)).bytes()))
        except obstore.exceptions.NotFoundError:
            return None

    def size(self, name: str) -> int | None:
        """The object's size (HEAD), or None when absent."""
        obstore = _obstore()
        try:
            return int(self._call("HEAD", name, lambda o: o.head(self._store, self.key(name)))["size"])
        except obstore.exceptions.NotFoundError:
            return None

    def list(self, under: str) -> Iterator[tuple[str, int]]:
        """(name relative to the prefix, size) of every object under ``under``."""
        base = self.key(under).rstrip("/") + "/"
        cut = len(self.prefix) + 1 if self.prefix else 0
        batches = self._call("LIST", under, lambda o: list(o.list(self._store, base, chunk_size=1000)))
        for batch in batches:
            for meta in batch:
                yield meta["path"][cut:], int(meta["size"])

    def read_into(self, name: str, start: int, out: np.ndarray) -> None:
        """Bytes ``[start, start + len(out))`` of the object into ``out`` (uint8, contiguous)."""
        obstore = _obstore()
        try:
            data = self._call("ranged GET", name, lambda o: o.get_range(self._store, self.key(name), start=start,
                                                                        length=len(out)))
        except obstore.exceptions.NotFoundError:
            raise OriginError("the object vanished while it was being read", path=self.url_of(name)) from None
        view = memoryview(data)
        if len(view) != len(out):
            raise OriginError(f"ranged GET of bytes {start}+{len(out)} returned {len(view)}", path=self.url_of(name))
        out[:] = np.frombuffer(view, dtype=np.uint8)

    def presign(self, name: str, ttl_s: int) -> str:
        """A presigned GET URL for the object ``name``, valid ``ttl_s`` seconds: the whole right to read it."""
        return self._call("presign", name, lambda o: o.sign(self._store, "GET", self.key(name),
                                                            timedelta(seconds=ttl_s)))

    def source(self, name: str) -> RangeSource:
        """One object as a :class:`RangeSource` (its size from a HEAD)."""
        size = self.size(name)
        if size is None:
            raise OriginError("no such object", path=self.url_of(name))
        return _S3Object(self, name, size)


class RangeSource(Protocol):
    """One immutable object read by byte ranges (an S3 object or a presigned link)."""

    url: str
    size: int

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Bytes ``[start, start + len(out))`` into ``out``; raises :class:`OriginError`."""


class _S3Object:
    def __init__(self, origin: Origin, name: str, size: int):
        self.origin, self.name, self.size, self.url = origin, name, size, origin.url_of(name)

    def read_into(self, start: int, out: np.ndarray) -> None:
        self.origin.read_into(self.name, start, out)


class HttpObject:
    """An object behind one (presigned) HTTP(S) URL, read by ``Range`` GETs, one connection per thread.

    Args:
        url: the link; its query string (the signature) is sent as is and never logged in full.
    """

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url.split('?')[0]!r}")
        self._parts, self._target = parts, parts.path + (f"?{parts.query}" if parts.query else "")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path}"  # what messages show: no signature
        self._local = threading.local()
        self.size = self._size()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
            conn = cls(self._parts.hostname, self._parts.port, timeout=CONNECT_TIMEOUT_S)  # raised once connected
            self._local.conn = conn
        return conn

    def _get(self, start: int, stop: int) -> http.client.HTTPResponse:
        """A GET of bytes ``[start, stop)``; retried once on a dropped keep-alive connection."""
        for attempt in range(2):
            conn = self._conn()
            try:
                conn.request("GET", self._target, headers={"Range": f"bytes={start}-{stop - 1}"})
                conn.sock.settimeout(REQUEST_TIMEOUT_S)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                if attempt:
                    raise OriginError(f"GET failed: {exc}", path=self.url) from None
                continue
            if resp.status in (200, 206):
                return resp
            body = resp.read(2048).decode("utf-8", "replace")
            code = body.split("<Code>")[1].split("</Code>")[0] if "<Code>" in body else ""
            hint = " (the link expired, was altered, or was not granted for this object)" if resp.status == 403 else ""
            raise OriginError(f"GET refused: HTTP {resp.status} {code}{hint}", path=self.url)
        raise AssertionError("unreachable")

    def _size(self) -> int:
        resp = self._get(0, 1)
        total = resp.getheader("Content-Range", "")
        resp.read()
        if resp.status != 206 or "/" not in total or not total.rsplit("/", 1)[1].isdigit():
            raise OriginError(f"the server does not serve byte ranges (status {resp.status})", path=self.url)
        return int(total.rsplit("/", 1)[1])

    def read_into(self, start: int, out: np.ndarray) -> None:
        resp = self._get(start, start + len(out))
        view, done = memoryview(out), 0
        try:
            while done < len(view):
                n = resp.readinto(view[done:])
                if not n:
                    break
                done += n
        except OSError as exc:
            self._local.conn = None
            raise OriginError(f"GET of bytes {start}+{len(out)} broke off: {exc}", path=self.url) from None
        if done != len(out) or resp.status != 206:
            self._local.conn = None
            raise OriginError(f"GET of bytes {start}+{len(out)} returned {done}", path=self.url)


def open_source(url: str, config: OriginConfig | None = None) -> RangeSource:
    """A :class:`RangeSource` for ``s3://bucket/key`` or an ``https://`` (presigned) URL."""
    if url.startswith("s3://"):
        parts = urlsplit(url)
        origin = Origin(f"s3://{parts.netloc}", config)
        return origin.source(parts.path.lstrip("/"))
    return HttpObject(url)


def is_remote(source: object) -> bool:
    """Whether ``source`` names an object at an origin rather than a local file."""
    return isinstance(source, str) and source.startswith(("s3://", "https://", "http://"))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 1200 else text[:1200] + "..."
