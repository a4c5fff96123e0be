"""Signed artifacts: an Ed25519 signature over a canonical statement of what a .kvf file holds.

The statement binds everything that decides what a consumer attaches (docs/FORMAT.md section numbers):

    tokens.sha256 (§5), tokens.count      which document
    model fingerprint and config (§3)     which model: weights, dtype, RoPE theta/scaling, layer types...
    tokenizer digest (§3)                 which tokenizer
    kv shape and dtype (§4), codec (§7),  how the bytes are laid out and decoded
    chunk_tokens, layout "NHD" (§6)
    merkle_root                           SHA-256 Merkle tree (RFC 6962 shape) over the *stored* bytes of every
                                          chunk, in index order: works for any codec
    header_sha256                         every byte before the first chunk: preamble, manifest (metadata and
                                          chunk index included), token ids, padding

and the bytes between chunks must be zero (§2), so every byte of the file is covered. CRC-32C checksums stay for
corruption; they are no security boundary (anyone can recompute them). The signature lives outside the .kvf in
a sidecar ``doc.kvf.sig`` (JSON: statement, key id, signature), written atomically.

Verifying never trusts the sidecar's statement: the statement is recomputed from the file, and the signature is
checked over those bytes; the sidecar's copy only serves to name the field that differs.

Example:
    >>> kvfast.keygen("publisher.key")                                   # doctest: +SKIP
    >>> kvfast.sign("doc.kvf", "publisher.key")                          # writes doc.kvf.sig  # doctest: +SKIP
    >>> kvfast.verify_signature("doc.kvf", ["publisher.key.pub"])        # doctest: +SKIP
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import stat
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from kvfast.errors import FileAccessError, SignatureError
from kvfast._fs import DEFAULT_THREADS, atomic_write, read_exact, read_small_file
from kvfast.format import DTYPE_NAMES, KvfReader, open_kvf, token_sha256

STATEMENT_VERSION = 1
SIG_SUFFIX = ".sig"
HASH_PIECE_BYTES = 1 << 20  # bytes read and hashed at a time: hashing memory is this per thread, not a chunk
_DOMAIN = b"kvfast signed statement v1\0"  # signatures over statements can never pass for anything else
# Keys and sidecars are read whole, so their size is capped: a PEM key has about 120 bytes, a sidecar a few KB
# (the model config dominates). A larger file is refused before it is read.
MAX_KEY_BYTES = 64 << 10
MAX_SIDECAR_BYTES = 1 << 20

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PublicKeyLike = Union["Ed25519PublicKey", "Ed25519PrivateKey", str, os.PathLike, bytes]


# -- keys ----------------------------------------------------------------------------------------------------
def _crypto() -> tuple[Any, Any]:
    """(``ed25519``, ``serialization``) of the ``cryptography`` package, imported on first use: loading unsigned
    KV must not need it (the GPU machines' images, for one, do not have it)."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ImportError("signing and verifying .kvf files needs the 'cryptography' package: "
                          "pip install 'cryptography>=42'") from None
    return ed25519, serialization


def key_id(public_key: Ed25519PublicKey) -> str:
    """``"ed25519:<32 hex>"``: the first 16 bytes of SHA-256 of the raw 32-byte public key."""
    _, serialization = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def keygen(path: str | os.PathLike) -> tuple[Path, Path]:
    """Create an Ed25519 key pair: ``path`` (private, PKCS#8 PEM, mode 0600) and ``path.pub`` (public, PEM).

    Refuses to overwrite an existing private key (``FileExistsError``).

    Returns:
        (private key path, public key path).
    """
    private = Path(path)
    ed25519, serialization = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = private.with_name(private.name + ".pub")
    _write_bytes(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _read_key_file(path: str | os.PathLike, *, private: bool) -> bytes:
    """A key file's bytes (a regular file of at most :data:`MAX_KEY_BYTES`), warning when its permissions let
    others read a private key or replace a public one (ssh refuses the first; kvfast warns, so a key shared
    read-only by a deployment still works)."""
    try:
        data, st = read_small_file(path, MAX_KEY_BYTES)
    except FileAccessError as exc:
        raise SignatureError(f"cannot use this {'private' if private else 'public'} key ({exc.detail})",
                             path=path) from None
    loose = stat.S_IRWXG | stat.S_IRWXO if private else stat.S_IWOTH
    if st.st_mode & loose:
        what = "readable by group or others" if private else "writable by anyone"
        warnings.warn(f"{os.fspath(path)}: the {'private' if private else 'public'} key is {what} (mode "
                      f"{stat.S_IMODE(st.st_mode):o}); chmod {'600' if private else 'go-w'} it", RuntimeWarning,
                      stacklevel=3)
    return data


def load_private_key(key: Ed25519PrivateKey | str | os.PathLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a key object or a PEM file made by :func:`keygen`.

    Raises:
        SignatureError: the file is missing, not a regular file, over :data:`MAX_KEY_BYTES`, or not an
            unencrypted Ed25519 PEM key. Warns (``RuntimeWarning``) when group or others may read it.
    """
    ed25519, serialization = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    try:
        loaded = serialization.load_pem_private_key(_read_key_file(key, private=True), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not an unencrypted PEM private key ({exc})", path=key) from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"key is {type(loaded).__name__}, kvfast signs with Ed25519", path=key)
    return loaded


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, a PEM file (public or private), or 32 raw bytes.

    Raises:
        SignatureError: the file is missing, not a regular file, over :data:`MAX_KEY_BYTES`, or not an Ed25519
            PEM key. Warns (``RuntimeWarning``) when anyone may write it.
    """
    ed25519, serialization = _crypto()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, bytes):
        if len(key) != 32:
            raise SignatureError(f"a raw Ed25519 public key has 32 bytes, got {len(key)}")
        return ed25519.Ed25519PublicKey.from_public_bytes(key)
    data = _read_key_file(key, private=False)
    try:
        loaded: Any = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            loaded = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"not a PEM Ed25519 key ({exc})", path=key) from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise SignatureError(f"key is {type(loaded).__name__}, kvfast verifies Ed25519", path=key)
    return loaded


def trusted_key_ids(keys: Iterable[PublicKeyLike]) -> dict[str, Ed25519PublicKey]:
    """``{key_id: public key}`` of the keys a consumer trusts."""
    out = {}
    for k in keys:
        pub = load_public_key(k)
        out[key_id(pub)] = pub
    return out


# -- the statement -------------------------------------------------------------------------------------------
def merkle_root(leaves: Sequence[bytes]) -> str:
    """RFC 6962 Merkle tree hash over leaf digests: ``H(0x00 || leaf)`` at the leaves, ``H(0x01 || l || r)`` at
    inner nodes, split at the largest power of two below ``n``. The shape fixes every leaf's position, so
    swapping, reordering, dropping or duplicating chunks changes the root."""
    if not leaves:
        return hashlib.sha256(b"").hexdigest()
    level = [hashlib.sha256(b"\x00" + d).digest() for d in leaves]

    def tree(a: int, b: int) -> bytes:
        if b - a == 1:
            return level[a]
        k = 1 << ((b - a - 1).bit_length() - 1)
        return hashlib.sha256(b"\x01" + tree(a, a + k) + tree(a + k, b)).digest()

    return tree(0, len(level)).hex()


@dataclass(frozen=True)
class Digests:
    """What a full read of a .kvf file's bytes found.

    Attributes:
        header_sha256: SHA-256 of every byte before the first chunk.
        chunk_sha256: per chunk, in index order, SHA-256 of its stored bytes.
        merkle_root: :func:`merkle_root` of ``chunk_sha256``.
        nbytes: bytes read.
    """

    header_sha256: str
    chunk_sha256: tuple[bytes, ...]
    merkle_root: str
    nbytes: int


def digests(reader: KvfReader, *, threads: int | None = None) -> Digests:
    """Read every chunk of the file once and hash it; padding must be zero. The header's digest is the reader's
    (:attr:`KvfReader.header_sha256`: the bytes it parsed).

    Reads go through the reader's own descriptor, the file it validated (reopening the path could find another
    file, put there after the open), in pieces of :data:`HASH_PIECE_BYTES` whatever size the manifest claims for
    a chunk; chunks are hashed on ``threads`` threads (default ``min(4, cpu_count)``).

    Raises:
        SignatureError: padding between chunks is not zero (§2), or the file changed size since it was opened.
    """
    chunks = reader.chunks
    fd = os.dup(reader.fileno())
    try:
        size = os.fstat(fd).st_size
        end = chunks[-1].offset + chunks[-1].length
        if size != end:
            raise SignatureError(f"file has {size} bytes, its manifest {end}: it changed since it was opened",
                                 path=reader.path)

        def chunk_digest(i: int) -> bytes:
            c = chunks[i]
            nxt = chunks[i + 1].offset if i + 1 < len(chunks) else c.offset + c.length
            digest = hashlib.sha256()
            piece = bytearray(min(HASH_PIECE_BYTES, nxt - c.offset))
            for at in range(c.offset, nxt, len(piece)):  # stored bytes, then padding up to the next chunk
                n = min(len(piece), nxt - at)
                if not read_exact(fd, memoryview(piece)[:n], at):
                    raise SignatureError(f"short read at offset {at}", path=reader.path)
                stored = max(0, min(n, c.offset + c.length - at))
                digest.update(memoryview(piece)[:stored])
                if piece.count(0, stored, n) != n - stored:
                    raise SignatureError(f"padding after chunk {i} is not zero (§2)", path=reader.path)
            return digest.digest()

        header = reader.header_sha256
        with ThreadPoolExecutor(threads or DEFAULT_THREADS) as pool:
            leaves = tuple(pool.map(chunk_digest, range(len(chunks))))
    finally:
        os.close(fd)
    return Digests(header, leaves, merkle_root(leaves), size)


def statement(reader: KvfReader, found: Digests | None = None) -> dict[str, Any]:
    """The canonical statement of an open file (computes :func:`digests` unless given)."""
    found = digests(reader) if found is None else found
    return _statement(reader, found.merkle_root, found.header_sha256)


def _statement(reader: KvfReader, root: str, header_sha256: str) -> dict[str, Any]:
    m = reader.manifest
    return {
        "statement": "kvfast.kvf", "version": STATEMENT_VERSION,
        "tokens": {"count": m.num_tokens, "sha256": token_sha256(reader.token_ids)},
        "model": {"fingerprint": m.fingerprint, "config": dict(m.config)},
        "tokenizer": m.tokenizer,
        "kv": {"num_layers": m.num_layers, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
               "dtype": DTYPE_NAMES[m.dtype], "layout": "NHD"},
        "codec": m.codec, "chunk_tokens": m.chunk_tokens, "num_chunks": len(reader.chunks),
        "merkle_root": root, "header_sha256": header_sha256,
    }


def canonical(obj: Any) -> bytes:
    """Compact, key-sorted JSON: one statement, one byte string."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sig_path(path: str | os.PathLike) -> Path:
    """Where a file's signature lives: ``doc.kvf`` -> ``doc.kvf.sig``."""
    p = Path(path)
    return p.with_name(p.name + SIG_SUFFIX)


# -- sign ----------------------------------------------------------------------------------------------------
def sign(path: str | os.PathLike, key: Ed25519PrivateKey | str | os.PathLike, *,
         output: str | os.PathLike | None = None) -> Path:
    """Sign a .kvf file: write its statement, the key id and an Ed25519 signature to ``doc.kvf.sig``.

    Args:
        path: the .kvf file (validated as :func:`kvfast.open` does; every chunk checksum is checked too).
        key: the publisher's private key (object or PEM file from :func:`keygen`).
        output: the sidecar to write (default ``path + ".sig"``); written atomically.

    Returns:
        The sidecar's path.

    Example:
        >>> kvfast.sign("doc.kvf", "publisher.key")  # doctest: +SKIP
        PosixPath('doc.kvf.sig')
    """
    private = load_private_key(key)
    with open_kvf(path) as reader:
        reader.verify()  # never sign bytes that are already corrupted
        body = statement(reader)
    signature = private.sign(_DOMAIN + canonical(body))
    out = Path(output) if output is not None else sig_path(path)
    sidecar = {"statement": body, "key_id": key_id(private.public_key()),
               "signature": base64.b64encode(signature).decode()}
    _write_bytes(out, json.dumps(sidecar, sort_keys=True, indent=1).encode() + b"\n")
    return out


# -- verify --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verified:
    """A verified signature: who signed which bytes.

    Attributes:
        key_id: the trusted key that signed.
        merkle_root, header_sha256: the digests the signature covers (recomputed from the file).
        statement_sha256: SHA-256 of the canonical statement.
        nbytes: bytes hashed.
    """

    key_id: str
    merkle_root: str
    header_sha256: str
    statement_sha256: str
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "merkle_root": self.merkle_root, "header_sha256": self.header_sha256,
                "statement_sha256": self.statement_sha256}


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """A signature sidecar's fields, checked for shape. Raises :class:`SignatureError` naming the field; a
    sidecar that is not a regular file of at most :data:`MAX_SIDECAR_BYTES` is refused before it is read."""
    p = Path(path)
    try:
        body = json.loads(read_small_file(p, MAX_SIDECAR_BYTES)[0])
    except FileAccessError as exc:
        if exc.errno == errno.ENOENT:
            raise SignatureError("no signature (an unsigned artifact; sign it with `kvfast sign`)", path=p) from None
        raise SignatureError(f"cannot use this signature sidecar ({exc.detail})", path=p) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SignatureError(f"signature sidecar is not JSON ({exc})", path=p) from None
    return _checked(body, p)


def _checked(body: Any, path: Path) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise SignatureError("signature sidecar is not a JSON object", path=path)
    for name, kind in (("statement", dict), ("key_id", str), ("signature", str)):
        if not isinstance(body.get(name), kind):
            raise SignatureError(f"signature sidecar field {name!r} is missing or not a {kind.__name__}", path=path)
    return body


def verify_signature(path: str | os.PathLike | KvfReader, trusted_keys: Iterable[PublicKeyLike], *,
                     signature: str | os.PathLike | dict[str, Any] | None = None,
                     threads: int | None = None) -> Verified:
    """Check that a .kvf file is signed by one of ``trusted_keys`` and that every byte is what was signed.

    Reads and hashes the whole file (SHA-256, at about the speed of one copy: see bench/RESULTS.md "Trust").

    Args:
        path: the .kvf file, or an open reader of it.
        trusted_keys: public keys (objects, PEM files, raw 32-byte keys) whose signatures are accepted.
        signature: the sidecar (default ``path + ".sig"``), or its fields as :func:`read_sidecar` returns them.
        threads: hashing threads.

    Returns:
        A :class:`Verified` record.

    Raises:
        SignatureError: no sidecar, a key not in ``trusted_keys``, a statement field that differs from the
            file (named), or a bad signature.
        FormatError: the .kvf file itself is invalid.
    """
    trusted = trusted_key_ids(trusted_keys)
    if not trusted:
        raise ValueError("trusted_keys is empty: give at least one public key")
    if isinstance(path, KvfReader):
        return _verify_open(path, trusted, signature, threads)
    with open_kvf(path) as reader:
        return _verify_open(reader, trusted, signature, threads)


def _verify_open(reader: KvfReader, trusted: dict[str, Ed25519PublicKey],
                 signature: str | os.PathLike | dict[str, Any] | None, threads: int | None) -> Verified:
    side, sig_file = _sidecar(reader, trusted, signature)  # an untrusted signer is refused before any hashing
    found = digests(reader, threads=threads)
    body = _check(reader, trusted, side, sig_file, found.merkle_root)
    return Verified(side["key_id"], found.merkle_root, found.header_sha256,
                    hashlib.sha256(canonical(body)).hexdigest(), found.nbytes)


@dataclass(frozen=True)
class SignedStatement:
    """A signature checked against everything in a file but its chunk bytes (:func:`check_statement`): what a
    load compares the Merkle leaves of the bytes it loaded against, so the bytes checked are the bytes used.

    Attributes:
        key_id: the trusted key that signed.
        merkle_root: the signed root the chunks' stored bytes must hash to.
        path: the .kvf file.
    """

    key_id: str
    merkle_root: str
    path: Path

    def check_leaves(self, leaves: Sequence[bytes]) -> None:
        """Raise :class:`SignatureError` unless ``leaves`` (per chunk, in index order, SHA-256 of its stored bytes
        as they were loaded) have the signed Merkle root."""
        if merkle_root(leaves) != self.merkle_root:
            raise SignatureError(f"the chunk bytes loaded do not have the merkle_root signed by {self.key_id}: the "
                                 "file was changed after signing, or while it was being loaded", path=self.path)


def check_statement(reader: KvfReader, trusted_keys: Iterable[PublicKeyLike], *,
                    signature: str | os.PathLike | dict[str, Any] | None = None) -> SignedStatement:
    """Check a file's signature over everything but its chunk bytes; the caller hashes those as it loads them and
    calls :meth:`SignedStatement.check_leaves` (what :func:`kvfast.load` with ``trusted_keys`` does: one read).

    The statement's ``merkle_root`` is the sidecar's claim, accepted only under a valid signature by a trusted
    key; every other field is recomputed from the reader (the header from the bytes it parsed).

    Raises:
        SignatureError: as :func:`verify_signature`, except for the chunk bytes.
    """
    trusted = trusted_key_ids(trusted_keys)
    if not trusted:
        raise ValueError("trusted_keys is empty: give at least one public key")
    side, sig_file = _sidecar(reader, trusted, signature)
    root = side["statement"].get("merkle_root")
    if not isinstance(root, str):
        raise SignatureError("signature sidecar field 'statement.merkle_root' is missing or not a str", path=sig_file)
    _check(reader, trusted, side, sig_file, root)
    return SignedStatement(side["key_id"], root, reader.path)


def _sidecar(reader: KvfReader, trusted: dict[str, Ed25519PublicKey],
             signature: str | os.PathLike | dict[str, Any] | None) -> tuple[dict[str, Any], Path]:
    """The sidecar's fields and path, refused unless signed by a key in ``trusted``."""
    if isinstance(signature, dict):
        sig_file = sig_path(reader.path)
        side = _checked(signature, sig_file)
    else:
        sig_file = Path(signature) if signature is not None else sig_path(reader.path)
        side = read_sidecar(sig_file)
    kid = side["key_id"]
    if kid not in trusted:
        raise SignatureError(f"signed by key {kid}, which is not among the {len(trusted)} trusted key(s)",
                             path=sig_file)
    return side, sig_file


def _check(reader: KvfReader, trusted: dict[str, Ed25519PublicKey], side: dict[str, Any], sig_file: Path,
           root: str) -> dict[str, Any]:
    """The statement of ``reader`` with Merkle root ``root``, after checking it is the one the sidecar signed."""
    kid = side["key_id"]
    body = _statement(reader, root, reader.header_sha256)
    claimed = side["statement"]
    for field in sorted(set(body) | set(claimed)):
        if field not in body or field not in claimed or body[field] != claimed[field]:
            raise SignatureError(f"statement field {field!r} differs from the file: the artifact was changed "
                                 "after signing, or the signature belongs to another artifact", path=reader.path)
    from cryptography.exceptions import InvalidSignature  # trusted keys were loaded: the package is there

    try:
        raw_sig = base64.b64decode(side["signature"], validate=True)
        if base64.b64encode(raw_sig).decode() != side["signature"]:  # one signature, one spelling
            raise ValueError("non-canonical base64")
        trusted[kid].verify(raw_sig, _DOMAIN + canonical(body))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"signature by {kid} is not valid for this statement", path=sig_file) from None
    return body


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))
