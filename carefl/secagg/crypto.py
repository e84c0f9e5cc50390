"""The cryptographic primitives of secure aggregation, from maintained libraries.

- key agreement: X25519 (``cryptography``), the shared secret stretched by HKDF-SHA256 with a
  label and the round's context, so one exchange gives independent keys for the share
  cipher and for the pairwise mask;
- share encryption: AES-256-GCM (``cryptography``), the sender, recipient, run and round as
  associated data, so a ciphertext cannot be replayed to another pair, run or round;
- secret sharing: Shamir over GF(2^128) (``pycryptodome``'s ``Shamir``, the library Flower's
  own SecAgg+ uses), one sharing per 16-byte chunk of a secret;
- mask generator: the AES-CTR keystream of a seed (``cryptography``; a 128-bit self-mask
  seed, 256-bit pairwise seeds from HKDF), read as uint32 words. Written here because
  Flower's ``pseudo_rand_gen`` seeds numpy's Mersenne Twister with 32 bits (the seed's words
  XOR-folded), so a mask could be found by trying 2^32 seeds; AES-CTR is a PRF of the whole
  seed.

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

#: bytes of a self-mask seed (AES-128: the 128-bit security X25519 gives too; half the
#: Shamir work of a 32-byte seed), of an X25519 key, and of a share of each
SEED_BYTES, KEY_BYTES = 16, 32
SEED_SHARE_BYTES, KEY_SHARE_BYTES = SEED_BYTES, KEY_BYTES
NONCE_BYTES = 12


def new_secret() -> bytes:
    """A self-mask seed: :data:`SEED_BYTES` from the OS's entropy."""
    return os.urandom(SEED_BYTES)


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


_ZEROS = bytes(0)  # the plaintext the keystream is XORed onto, grown to the largest d seen


def mask(seed: bytes, d: int, out: np.ndarray | None = None) -> np.ndarray:
    """``d`` uint32 words of the AES-CTR keystream of ``seed`` (16 or 32 bytes: AES-128 or
    AES-256), nonce 0; written into ``out`` (uint32, at least d + 4 words) when given, so a
    caller making many masks reuses one buffer.

    Indistinguishable from uniform on Z_{2^32}^d to anyone without ``seed`` (AES as a PRF);
    ~0.003 s per 7 million words here: the keystream is written straight into the array
    (``update_into``; ``update`` would allocate and copy 4d bytes twice, ~7x slower)."""
    global _ZEROS
    if len(_ZEROS) < 4 * d:
        _ZEROS = bytes(4 * d)
    if out is None:
        out = np.empty(d + 4, dtype=np.uint32)  # update_into wants block size - 1 spare bytes
    Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update_into(
        memoryview(_ZEROS)[:4 * d], out.view(np.uint8)[:4 * d + 16])
    return out[:d] if out.dtype.byteorder in "=|<" else out[:d].astype("<u4")


def split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir shares of ``secret`` (16 or 32 bytes, one GF(2^128) sharing per 16): share ``i``
    (0-based) belongs to index ``i + 1``, as long as the secret; any ``threshold`` of them
    give the secret back, fewer reveal nothing about it."""
    chunks = [Shamir.split(threshold, count, secret[i:i + 16], ssss=False) for i in range(0, len(secret), 16)]
    return [b"".join(part[1] for part in parts) for parts in zip(*chunks)]


def combine(shares: dict[int, bytes]) -> bytes:
    """The secret from ``{index (1-based): share}``; the caller gives at least the threshold."""
    size = len(next(iter(shares.values())))
    return b"".join(Shamir.combine([(i, s[h:h + 16]) for i, s in shares.items()], ssss=False) for h in range(0, size, 16))


def commitment(secret: bytes) -> str:
    """SHA-256 of a secret (hex): lets the server check what it reconstructs from shares."""
    return hashlib.sha256(secret).hexdigest()
