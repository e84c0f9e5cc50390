"""The cryptographic primitives of secure aggregation, from maintained libraries.

- key agreement: X25519 (``cryptography``), the shared secret stretched by HKDF-SHA256 with a
  label and the round's context, so one exchange gives independent keys for the share
  cipher and for the pairwise mask;
- share encryption: AES-256-GCM (``cryptography``), the sender, recipient, run and round as
  associated data, so a ciphertext cannot be replayed to another pair, run or round;
- secret sharing: Shamir over GF(2^128) (``pycryptodome``'s ``Shamir``, the library Flower's
  own SecAgg+ uses), a 32-byte secret as two 16-byte chunks;
- mask generator: the AES-256-CTR keystream of a 32-byte seed (``cryptography``), read as
  uint32 words. Written here because Flower's ``pseudo_rand_gen`` seeds numpy's Mersenne
  Twister with 32 bits (the seed's words XOR-folded), so a mask could be found by trying 2^32
  seeds; AES-CTR is a PRF of the full 256-bit seed.

Nothing here is Flower: the ServerApp, the in-process transport and the tests all use it.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: bytes of a secret (X25519 private key, self-mask seed), a public key, and one Shamir share
SECRET_BYTES = KEY_BYTES = 32
SHARE_BYTES = 32
NONCE_BYTES = 12


def new_secret() -> bytes:
    """32 bytes from the OS's entropy (a self-mask seed)."""
    return os.urandom(SECRET_BYTES)


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes ``(private 32, public 32)``."""
    private = X25519PrivateKey.generate()
    return (private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption()), public_of(private))


def public_of(private: X25519PrivateKey | bytes) -> bytes:
    """The raw public key of a raw (or loaded) X25519 private key."""
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def usable_public(public: bytes) -> bool:
    """Whether ``public`` is an X25519 public key a key agreement can use: not one of the
    small-order points, with which every exchange gives the all-zero secret (``cryptography``
    refuses those; checked once, against a throwaway key, where the key comes in)."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


def agree(private: bytes, public: bytes, label: str, context: str) -> bytes:
    """A 32-byte key both ends derive alike: HKDF-SHA256(X25519(private, public), info=label|context).

    Raises:
        ValueError: ``public`` is not a valid X25519 public key (or the exchange gives the
            all-zero secret of a small-order point, which ``cryptography`` refuses).
    """
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    info = f"carefl-secagg/{label}/{context}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def encrypt(key: bytes, plaintext: bytes, associated: str) -> bytes:
    """AES-256-GCM: ``nonce (12 bytes) || ciphertext || tag (16 bytes)``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated.encode())


def decrypt(key: bytes, sealed: bytes, associated: str) -> bytes | None:
    """The plaintext of :func:`encrypt`'s output, or None if it does not authenticate."""
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated.encode())
    except (InvalidTag, ValueError):
        return None


def mask(seed: bytes, d: int) -> np.ndarray:
    """``d`` uint32 words of the AES-256-CTR keystream of ``seed`` (32 bytes), nonce 0.

    Indistinguishable from uniform on Z_{2^32}^d to anyone without ``seed`` (AES as a PRF);
    ~0.02 s per million words here."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * d)), dtype="<u4").astype(np.uint32, copy=False)


def split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir shares of a 32-byte ``secret``: share ``i`` (0-based) belongs to index ``i + 1``;
    any ``threshold`` of them give the secret back, fewer reveal nothing about it."""
    halves = [Shamir.split(threshold, count, secret[i:i + 16], ssss=False) for i in (0, 16)]
    return [low[1] + high[1] for low, high in zip(*halves)]


def combine(shares: dict[int, bytes]) -> bytes:
    """The secret from ``{index (1-based): share}``; the caller gives at least the threshold."""
    return b"".join(Shamir.combine([(i, s[h:h + 16]) for i, s in shares.items()], ssss=False) for h in (0, 16))


def commitment(secret: bytes) -> str:
    """SHA-256 of a secret (hex): lets the server check what it reconstructs from shares."""
    return hashlib.sha256(secret).hexdigest()
