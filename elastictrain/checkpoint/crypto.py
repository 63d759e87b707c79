"""Seal and open chunks and tables, derive chunk ids, wrap data keys, sign manifests.

Every key used here derives from a per-run 32-byte data key (HKDF-SHA256 with a
purpose label), except the key that wraps the data key and, optionally, the
manifest signing seed. Chunks are sealed with AES-256-GCM under a synthetic
nonce (the first 12 bytes of the chunk id, itself a keyed hash of the
plaintext): equal plaintexts give equal stored bytes, so retries and
deduplication are idempotent, and a nonce repeats only with its plaintext.

Chunk ids are BLAKE3: keyed (BLAKE3's MAC mode, key derived from the data key)
when encrypted, so stored ids reveal no plaintext hash; plain BLAKE3 otherwise.
Measured on this project's 2-core machines: BLAKE3 hashes 4 MiB pieces at
about 8 GB/s per core against 1.9 GB/s for HMAC-SHA256 (SHA-NI), and the chunk
id is computed over every byte of every full save, so it sets the save's pace.
Pure: no storage, no torch.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Callable, Iterator, Union

from blake3 import blake3
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from elastictrain.errors import CheckpointCorrupt, WrongKey

Buffer = Union[bytes, bytearray, memoryview]
NonceSource = Callable[[int], bytes]

CHUNK_MAGIC = b"ETC1"
PLAIN, SEALED = 0, 1
CHUNK_HEADER = len(CHUNK_MAGIC) + 1
TAG = 16
KEY_BYTES = 32


def derive(secret: bytes, purpose: str) -> bytes:
    """A 32-byte subkey of `secret` for one purpose (HKDF-SHA256)."""
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=b"elastictrain/v1/" + purpose.encode()).derive(secret)


class DataKeys:
    """The subkeys of one run's data key: chunk ids, chunk sealing, table sealing."""

    def __init__(self, data_key: bytes):
        if len(data_key) != KEY_BYTES:
            raise WrongKey(f"data key must be {KEY_BYTES} bytes, got {len(data_key)}")
        self.id_key = derive(data_key, "chunk-id")
        self.chunk_seal_key = derive(data_key, "chunk-seal")
        self.chunk_aead = AESGCM(self.chunk_seal_key)
        self.table_aead = AESGCM(derive(data_key, "table-seal"))
        self.signing_seed = derive(data_key, "manifest-signing")


def chunk_id(data: Buffer, keys: DataKeys | None) -> str:
    """Content id of a chunk: keyed BLAKE3 when encrypted, BLAKE3 otherwise (64 hex digits)."""
    if keys is None:
        return blake3(data).hexdigest()
    return blake3(data, key=keys.id_key).hexdigest()


def _chunk_aad(cid: str, length: int) -> bytes:
    return b"elastictrain/v1/chunk\x00" + bytes.fromhex(cid) + struct.pack("<Q", length)


def sealed_size(length: int, encrypted: bool) -> int:
    """Stored size of a chunk holding `length` plaintext bytes."""
    return CHUNK_HEADER + length + (TAG if encrypted else 0)


SEAL_PIECE = 4 << 20


class SealedChunk:
    """The stored form of a chunk, made piece by piece each time it is iterated.

    Plain chunks yield their header and the data itself (no copy). Encrypted ones are sealed in
    4 MiB pieces into one small buffer that stays in cache, which the consumer (a file write)
    copies out before asking for the next piece: one pass over memory instead of sealing the
    whole chunk into a buffer and copying that (measured here: an encrypted 1 GiB save went
    from 0.6 s to about 0.22 s). The bytes equal one-shot AES-256-GCM. Iterable again (for retries);
    a yielded piece is valid only until the next one is requested.
    """

    def __init__(self, data: Buffer, cid: str, keys: DataKeys | None):
        self.data = memoryview(data).cast("B")
        self.cid, self.keys = cid, keys
        self.size = sealed_size(self.data.nbytes, keys is not None)

    def __iter__(self) -> Iterator[Buffer]:
        if self.keys is None:
            yield CHUNK_MAGIC + bytes([PLAIN])
            yield self.data
            return
        yield CHUNK_MAGIC + bytes([SEALED])
        length = self.data.nbytes
        sealer = Cipher(algorithms.AES(self.keys.chunk_seal_key), modes.GCM(bytes.fromhex(self.cid)[:12])).encryptor()
        sealer.authenticate_additional_data(_chunk_aad(self.cid, length))
        out = memoryview(bytearray(min(SEAL_PIECE, length) + 15))
        for off in range(0, length, SEAL_PIECE):
            n = sealer.update_into(self.data[off : off + SEAL_PIECE], out)
            yield out[:n]
        sealer.finalize()
        yield sealer.tag


def seal_chunk(data: Buffer, cid: str, keys: DataKeys | None) -> bytes:
    """The stored form of a chunk as one bytes object (see `SealedChunk` to stream it)."""
    return b"".join(bytes(p) for p in SealedChunk(data, cid, keys))


def open_chunk(blob: Buffer, cid: str, length: int, keys: DataKeys | None, out: memoryview) -> None:
    """Verify a stored chunk against its id and write its plaintext into `out` (len == length).

    Raises:
        CheckpointCorrupt: wrong size, bad header, failed tag or hash.
    """
    blob = memoryview(blob)
    encrypted = keys is not None
    if len(blob) != sealed_size(length, encrypted):
        raise CheckpointCorrupt(f"chunk {cid[:16]}: {len(blob)} bytes, expected {sealed_size(length, encrypted)}")
    if bytes(blob[: len(CHUNK_MAGIC)]) != CHUNK_MAGIC or blob[len(CHUNK_MAGIC)] != (SEALED if encrypted else PLAIN):
        raise CheckpointCorrupt(f"chunk {cid[:16]}: bad header")
    body = blob[CHUNK_HEADER:]
    if not encrypted:
        # copy a piece, then hash the copy while it is in cache: one pass over memory, and what is
        # verified is what is handed out, even if the stored bytes change meanwhile
        hasher = blake3()
        for off in range(0, length, SEAL_PIECE):
            end = min(off + SEAL_PIECE, length)
            out[off:end] = body[off:end]
            hasher.update(out[off:end])
        if hasher.hexdigest() != cid:
            raise CheckpointCorrupt(f"chunk {cid[:16]}: content does not match its hash")
        return
    try:
        keys.chunk_aead.decrypt_into(bytes.fromhex(cid)[:12], body, _chunk_aad(cid, length), out)
    except InvalidTag:
        raise CheckpointCorrupt(f"chunk {cid[:16]}: authentication failed (tampered or wrong run)") from None


def seal_blob(aead: AESGCM, data: bytes, aad: bytes, nonce: bytes) -> bytes:
    """nonce || AES-256-GCM(data) for small blobs (tables, wrapped keys)."""
    return nonce + aead.encrypt(nonce, data, aad)


def open_blob(aead: AESGCM, blob: bytes, aad: bytes, what: str, error: type = CheckpointCorrupt) -> bytes:
    if len(blob) < 12 + TAG:
        raise error(f"{what} is truncated")
    try:
        return aead.decrypt(blob[:12], blob[12:], aad)
    except InvalidTag:
        raise error(f"{what} does not open: tampered, or another key or run") from None


def wrap_key(master: bytes, data_key: bytes, context: bytes, nonce: bytes) -> bytes:
    """Encrypt a data key under a master key (envelope encryption)."""
    return seal_blob(AESGCM(master), data_key, b"elastictrain/v1/wrap\x00" + context, nonce)


def unwrap_key(master: bytes, wrapped: bytes, context: bytes) -> bytes:
    return open_blob(AESGCM(master), wrapped, b"elastictrain/v1/wrap\x00" + context, "wrapped data key", WrongKey)


def key_fingerprint(secret: bytes) -> str:
    """A public id of a secret key that reveals nothing about it."""
    return hmac.digest(secret, b"elastictrain/v1/key-id", "sha256").hex()[:16]


class Signer:
    """Ed25519 signing from a 32-byte seed; its public key identifies it."""

    def __init__(self, seed: bytes):
        self._seed = seed
        self._private = Ed25519PrivateKey.from_private_bytes(derive(seed, "ed25519-seed"))
        self.public = self._private.public_key()
        raw = self.public.public_bytes_raw()
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]

    def __repr__(self) -> str:  # never show the seed
        return f"Signer({self.key_id})"

    def subkey(self, purpose: str) -> bytes:
        """A 32-byte secret derived from the signing seed for another purpose (say, a MAC key)."""
        return derive(self._seed, "signer/" + purpose)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self.public.verify(signature, message)
            return True
        except InvalidSignature:
            return False


def verify_public(public: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public.verify(signature, message)
        return True
    except InvalidSignature:
        return False
