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

import numpy as np
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


def prg_chunks(seed: bytes, length: int, device: torch.device | str = "cpu", chunk: int = CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, int64 tensor of uint32 words in [0, 2^32)) covering `length` words."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    for start in range(0, length, chunk):
        n = min(chunk, length - start)
        words = np.frombuffer(encryptor.update(bytes(4 * n)), dtype="<u4")
        yield start, torch.from_numpy(words.astype(np.int64)).to(device, non_blocking=True)


def add_mask_(acc: torch.Tensor, seed: bytes, sign: int, chunk: int = CHUNK) -> None:
    """acc += sign * PRG(seed), in int64 without reduction (callers reduce mod 2^32 once:
    a few thousand terms below 2^32 cannot overflow int64)."""
    for start, words in prg_chunks(seed, acc.numel(), acc.device, chunk):
        view = acc[start:start + words.numel()]
        if sign > 0:
            view += words
        else:
            view -= words
