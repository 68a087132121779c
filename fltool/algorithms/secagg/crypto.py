"""The cryptographic primitives of SecAgg(+), all from the `cryptography` package.

- Key agreement: X25519; the shared secret is never used directly but through HKDF-SHA256
  with an `info` naming the purpose (mask seed or channel key), the round and the pair
  (ordered, so both ends derive the same key).
- Relayed messages: AES-256-GCM with a random 96-bit nonce; the associated data binds
  sender, receiver and round, so the server can neither redirect nor replay a ciphertext
  into another pair or round (decryption fails with `TamperedMessage`).
- Masks: AES-256-CTR keyed by a 32-byte seed as a PRG; its output, read as little-endian
  uint32, is the mask mod 2^32. The PRG runs on the CPU and is streamed in chunks that
  are converted to int64 tensors and moved to the target device, so memory is bounded
  by the chunk, not the model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fltool.errors import FltoolError

NONCE_BYTES = 12
PUBLIC_KEY_BYTES = 32
CHUNK = 1 << 20  # PRG words per chunk: 4 MiB of AES output, 8 MiB as int64


class TamperedMessage(FltoolError):
    """A relayed ciphertext failed authentication (modified, misdirected or replayed)."""


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()  # OS randomness


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """Raw private key, only to be Shamir-shared (never sent or stored in the clear)."""
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def load_private(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(key: X25519PrivateKey, peer_public: bytes, purpose: str, round_id: int, a: int, b: int) -> bytes:
    """A 32-byte key shared by clients a and b for `purpose` in `round_id` (symmetric in a, b)."""
    shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    lo, hi = min(a, b), max(a, b)
    info = f"fltool-secagg|{purpose}|round={round_id}|pair={lo},{hi}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def associated_data(sender: int, receiver: int, round_id: int) -> bytes:
    return f"fltool-secagg|share|round={round_id}|from={sender}|to={receiver}".encode()


def encrypt(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def decrypt(key: bytes, message: bytes, ad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(message[:NONCE_BYTES], message[NONCE_BYTES:], ad)
    except InvalidTag:
        raise TamperedMessage("secagg: a relayed share failed authentication (tampered, misdirected or replayed)") from None


def _words(seed: bytes, length: int, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, int32 view of the next PRG words): one reused buffer, so each view is
    valid only until the next step. int32 rather than uint32: a word read signed differs
    from it by 2^32, which the final reduction mod 2^32 removes, and torch adds int32
    into int64 without a conversion pass."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    size = min(chunk, length)
    zeros, out = bytes(4 * size), bytearray(4 * size + 15)  # update_into wants block_size - 1 spare
    for start in range(0, length, chunk):
        n = min(chunk, length - start)
        encryptor.update_into(memoryview(zeros)[: 4 * n], out)
        yield start, torch.frombuffer(out, dtype=torch.int32, count=n)


def prg_chunks(seed: bytes, length: int, device: torch.device | str = "cpu", chunk: int = CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, int64 tensor of uint32 words in [0, 2^32)) covering `length` words."""
    for start, words in _words(seed, length, chunk):
        yield start, words.to(device=device, dtype=torch.int64).bitwise_and_(0xFFFFFFFF)


def add_mask_(acc: torch.Tensor, seed: bytes, sign: int, chunk: int = CHUNK) -> None:
    """acc += sign * PRG(seed) (mod 2^32), in int64 without reduction: callers reduce
    mod 2^32 once, and a few thousand terms of magnitude < 2^32 cannot overflow int64.
    Each chunk goes to acc's device as int32 (half the bytes of int64)."""
    for start, words in _words(seed, acc.numel(), chunk):
        view = acc[start:start + words.numel()]
        words = words.to(acc.device) if acc.device.type != "cpu" else words
        if sign > 0:
            view.add_(words)
        else:
            view.sub_(words)
