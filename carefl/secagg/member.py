"""A hospital's side of secure aggregation: its keys, its shares, its masked input.

Written here over CareFL's messages (Flower 1.41 has SecAgg+ only through its legacy compat
layer); the primitives are :mod:`carefl.secagg.crypto`'s. The stages of one round:

0. **advertise** (with the training reply): fresh X25519 pairs ``c`` (share cipher) and ``s``
   (masks) and a 16-byte self-mask seed ``b``; the quantised update waits in :class:`Pending`
   (the hospital's state dir, mode 0600). The advert -- both public keys and SHA-256 of ``b``
   -- is signed with the hospital's Ed25519 key, the key its receipts verify under.
1. **share**: the server sends the bucket (every member's advert, in order: position i+1 is
   the Shamir index) and the threshold t. The hospital checks, against its own policy, that
   it is in the bucket with ITS keys, that the bucket has at least ``secagg-min-bucket``
   members, that ``secagg-min-threshold`` * s < t <= s (at least a majority) and that the sum
   cannot overflow; then it splits ``b`` and its
   mask key ``s_sk`` into s shares each and encrypts peer j's pair for j alone.
2. **mask**: the server forwards the ciphertexts addressed to it; U1 = their senders and itself
   (at least t). It sends ``y = q + PRG(b) + sum_{v in U1} +-PRG(k_sv) mod 2^32``, with
   ``+`` towards a later position, ``-`` towards an earlier one, so pairwise masks cancel in
   the sum of U1.
3. **unmask**: the server names the survivors U2 (sent y) and the dropped U1 \\ U2. The
   hospital checks U2 and the dropped partition its U1, it is in U2 and |U2| >= t, then sends
   its share of ``b`` of each survivor and of ``s_sk`` of each dropped member -- never both
   for one member -- and forgets the round (a second unmask is refused).

What this guarantees (Bell et al. 2020, Thm. 2): about the honest members' updates the
server learns nothing but the sum over U2 -- if it follows the protocol, while it colludes with
k < t members of the bucket (k shares of a secret reveal nothing); if it deviates, telling
hospitals different U2s, while k < 2t - s: each honest member reveals one share kind per peer,
so reconstructing both ``b`` and ``s_sk`` of one member takes two sets of t shares that overlap
only in colluders. t is the server's ``strategy.secagg.threshold`` (default a majority, most
tolerant of dropouts, for which 2t - s is 1 or 2); a hospital demanding more sets
``secagg-min-threshold`` (e.g. 0.75: t > 3s/4, then k < s/2). The server chooses buckets; a
hospital that sets ``secagg-min-bucket=m`` is never in a bucket of fewer than m.
Members the server invents (Sybils whose keys it holds) are kept out only by a hospital that
lists its peers' signing keys (``secagg-peer-keys``): each advert is signed with its
hospital's Ed25519 key, so an invented member has no listed key to sign with.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from carefl.budget import run_file
from carefl.checkpoint import atomic_save
from carefl.errors import CareFLError
from carefl.receipts import SigningKey, verify_signature
from carefl.secagg import crypto
from carefl.secagg.quantize import max_bucket, quantize

#: the Flower message type of a stage (``@app.train("secagg")`` in the ClientApp)
MESSAGE_TYPE = "train.secagg"
#: fields of an advert, in the order they are signed (the signature covers all but itself)
ADVERT_KEYS = ("run_id", "round", "hospital", "dim", "c_pk", "s_pk", "b_commit", "public_key", "signature")
MAX_PAYLOAD_CHARS = 4_000_000


class SecAggRefused(CareFLError):
    """A secure-aggregation message this hospital will not serve (the reason says why)."""


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def unb64(text: object, size: int | None = None) -> bytes | None:
    """The bytes of canonical base64 ``text`` (of ``size`` bytes if given), else None."""
    if not isinstance(text, str) or len(text) > 4 * MAX_PAYLOAD_CHARS // 3:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    return raw if (size is None or len(raw) == size) and b64(raw) == text else None


def context(run_id: str, server_round: int) -> str:
    return f"{run_id}/{server_round}"


def advert_problem(advert: object, run_id: str, server_round: int, dim: int) -> str | None:
    """Why ``advert`` is not a well-formed, self-signed advert of this round, or None."""
    if not isinstance(advert, dict) or set(advert) != set(ADVERT_KEYS):
        return f"an advert must hold exactly {list(ADVERT_KEYS)}"
    if advert["run_id"] != run_id or advert["round"] != server_round or advert["dim"] != dim:
        return "an advert is for another run, round or model size"
    keys = [unb64(advert[k], crypto.KEY_BYTES) for k in ("c_pk", "s_pk")]
    if any(k is None or not crypto.usable_public(k) for k in keys):
        return "an advert's public keys are not usable X25519 keys (32-byte base64, not a small-order point)"
    if not (isinstance(advert["b_commit"], str) and len(advert["b_commit"]) == 64):
        return "an advert's b_commit is not a SHA-256 hex digest"
    unsigned = {k: advert[k] for k in ADVERT_KEYS if k != "signature"}
    if not verify_signature(advert["public_key"], unsigned, advert["signature"]):
        return f"the advert of {str(advert['hospital'])[:64]!r} is not signed by the key it names"
    return None


@dataclass
class Pending:
    """What a hospital keeps between the stages of one round (never sent).

    ``levels``: its quantised, clipped update, uint32 (d,). ``bucket``: the adverts of its
    bucket in order (after stage 1). ``held``: member -> (share of its b, 16 bytes; share of
    its s_sk, 32 bytes), this hospital's index (after stage 2). ``u1``: members that shared.
    """

    run_id: str
    round: int
    hospital: str
    c_sk: bytes
    s_sk: bytes
    b: bytes
    levels: np.ndarray
    stage: str = "advertised"
    bucket: list[dict] = field(default_factory=list)
    threshold: int = 0
    held: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    u1: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Atomically, mode 0600 (it holds the round's secrets and the hospital's update)."""
        meta = asdict(self)
        meta.pop("levels")
        meta.update(c_sk=b64(self.c_sk), s_sk=b64(self.s_sk), b=b64(self.b),
                    held={k: [b64(x), b64(y)] for k, (x, y) in self.held.items()})
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_save({"meta": json.dumps(meta), "levels": torch.from_numpy(self.levels.view(np.int32))}, path)
        os.chmod(path, 0o600)

    @classmethod
    def load(cls, path: Path) -> Pending:
        saved = torch.load(path, weights_only=True)
        meta = json.loads(saved["meta"])
        meta.update(c_sk=base64.b64decode(meta["c_sk"]), s_sk=base64.b64decode(meta["s_sk"]), b=base64.b64decode(meta["b"]),
                    held={k: (base64.b64decode(x), base64.b64decode(y)) for k, (x, y) in meta["held"].items()},
                    levels=saved["levels"].numpy().view(np.uint32))
        return cls(**meta)


def pending_path(state_dir: Path, run_id: str) -> Path:
    """Where a hospital keeps the round in progress of run ``run_id`` (one per run)."""
    return run_file(state_dir, "secagg", run_id)


def advertise(key: SigningKey, run_id: str, server_round: int, hospital: str, update: Tensor, bound: float,
              bits: int) -> tuple[Pending, dict]:
    """Stage 0: fresh keys and seed for this round; ``update`` float32 (d,) is clipped to L2
    ``bound`` and quantised to ``bits``. Returns (what to keep, the signed advert to send)."""
    c_sk, c_pk = crypto.new_key_pair()
    s_sk, s_pk = crypto.new_key_pair()
    b = crypto.new_secret()
    advert = {"run_id": run_id, "round": server_round, "hospital": hospital, "dim": int(update.numel()),
              "c_pk": b64(c_pk), "s_pk": b64(s_pk), "b_commit": crypto.commitment(b), "public_key": key.public_b64}
    advert["signature"] = key.sign(advert)
    return Pending(run_id, server_round, hospital, c_sk, s_sk, b, quantize(update, bound, bits)), advert


def _expect(pending: Pending, payload: object, stage: str, keys: set[str]) -> dict:
    if not isinstance(payload, dict) or set(payload) != keys | {"stage", "run_id", "round"}:
        raise SecAggRefused(f"a secure-aggregation {stage} message must hold exactly {sorted(keys | {'stage', 'run_id', 'round'})}")
    if payload["stage"] != stage or payload["run_id"] != pending.run_id or payload["round"] != pending.round:
        raise SecAggRefused(f"expected the {stage} stage of round {pending.round} of this run; got "
                            f"{str(payload['stage'])[:20]!r} for round {str(payload['round'])[:12]}")
    expected = {"share": "advertised", "mask": "shared", "unmask": "masked"}[stage]
    if pending.stage != expected:
        raise SecAggRefused(f"the {stage} stage came after the {pending.stage} stage; a hospital answers each stage once")
    return payload


def share(pending: Pending, payload: object, min_bucket: int, bits: int, min_threshold: float = 0.5,
          peer_keys: dict[str, str] | None = None) -> dict:
    """Stage 1: check the bucket against the hospital's policy (``secagg-min-bucket``,
    ``secagg-min-threshold``: t must exceed that fraction of s; ``secagg-peer-keys``: every
    member listed there and its advert signed with that key), then its encrypted shares.

    Returns ``{"shares": {peer: base64 ciphertext}}``. Raises :class:`SecAggRefused`."""
    payload = _expect(pending, payload, "share", {"bucket", "threshold"})
    bucket, t = payload["bucket"], payload["threshold"]
    if not isinstance(bucket, list) or not bucket:
        raise SecAggRefused("the bucket must be a non-empty list of adverts")
    dim = len(pending.levels)
    for advert in bucket:
        problem = advert_problem(advert, pending.run_id, pending.round, dim)
        if problem:
            raise SecAggRefused(problem)
    names = [a["hospital"] for a in bucket]
    s = len(bucket)
    if len(set(names)) != s or len({a["c_pk"] for a in bucket}) != s or len({a["s_pk"] for a in bucket}) != s:
        raise SecAggRefused("a bucket names a member twice or repeats a key")
    unknown = [a["hospital"] for a in bucket if peer_keys is not None and peer_keys.get(a["hospital"]) != a["public_key"]]
    if unknown:
        raise SecAggRefused(f"bucket members {sorted(unknown)[:5]} are not in this hospital's secagg-peer-keys with the "
                            "key their adverts are signed with: the server may have invented them")
    mine = [a for a in bucket if a["hospital"] == pending.hospital]
    if not mine or (unb64(mine[0]["c_pk"]), unb64(mine[0]["s_pk"])) != (crypto.public_of(pending.c_sk), crypto.public_of(pending.s_sk)):
        raise SecAggRefused(f"the bucket does not hold {pending.hospital} with the keys it advertised")
    if s < min_bucket:
        raise SecAggRefused(f"a bucket of {s} is smaller than this hospital's secagg-min-bucket={min_bucket}: the "
                            "server would learn a sum of too few updates")
    floor = max(0.5, min_threshold) * s
    if not (isinstance(t, int) and not isinstance(t, bool) and floor < t <= s):
        raise SecAggRefused(f"threshold {str(t)[:12]} must be a whole number in ({floor:g}, {s}] (more than "
                            f"secagg-min-threshold={max(0.5, min_threshold):g} of the bucket's {s})")
    if s > max_bucket(bits):
        raise SecAggRefused(f"a bucket of {s} could overflow the 32-bit sum at {bits} bits")
    ctx = context(pending.run_id, pending.round)
    b_shares, sk_shares = crypto.split(pending.b, t, s), crypto.split(pending.s_sk, t, s)
    me = names.index(pending.hospital)
    shares = {}
    for j, advert in enumerate(bucket):
        if j == me:
            continue
        key = crypto.agree(pending.c_sk, unb64(advert["c_pk"]), "share", ctx)
        shares[advert["hospital"]] = b64(crypto.encrypt(key, b_shares[j] + sk_shares[j], f"{ctx}/{pending.hospital}->{advert['hospital']}"))
    pending.held[pending.hospital] = (b_shares[me], sk_shares[me])
    pending.bucket, pending.threshold, pending.stage = bucket, t, "shared"
    return {"shares": shares}


def _position(pending: Pending) -> dict[str, int]:
    return {a["hospital"]: i for i, a in enumerate(pending.bucket)}


def mask(pending: Pending, payload: object) -> np.ndarray:
    """Stage 2: decrypt the shares addressed to it, then its masked input, uint32 (d,)."""
    payload = _expect(pending, payload, "mask", {"shares"})
    received, where = payload["shares"], _position(pending)
    if not isinstance(received, dict) or not set(received) <= set(where) - {pending.hospital}:
        raise SecAggRefused("shares must come from other members of this hospital's bucket")
    ctx = context(pending.run_id, pending.round)
    for sender, sealed in received.items():
        advert = pending.bucket[where[sender]]
        key = crypto.agree(pending.c_sk, unb64(advert["c_pk"]), "share", ctx)
        raw = unb64(sealed)
        plain = crypto.decrypt(key, raw, f"{ctx}/{sender}->{pending.hospital}") if raw else None
        if plain is None or len(plain) != crypto.SEED_SHARE_BYTES + crypto.KEY_SHARE_BYTES:
            raise SecAggRefused(f"the shares from {sender[:64]} do not decrypt: they were not sealed for this hospital")
        pending.held[sender] = (plain[:crypto.SEED_SHARE_BYTES], plain[crypto.SEED_SHARE_BYTES:])
    u1 = sorted({*received, pending.hospital}, key=where.get)
    if len(u1) < pending.threshold:
        raise SecAggRefused(f"only {len(u1)} members shared, below the threshold {pending.threshold}")
    d, me = len(pending.levels), where[pending.hospital]
    y = pending.levels + crypto.mask(pending.b, d)
    for peer in u1:
        if peer == pending.hospital:
            continue
        seed = crypto.agree(pending.s_sk, unb64(pending.bucket[where[peer]]["s_pk"]), "mask", ctx)
        y = y + crypto.mask(seed, d) if me < where[peer] else y - crypto.mask(seed, d)
    pending.u1, pending.stage = u1, "masked"
    return y


def unmask(pending: Pending, payload: object) -> dict:
    """Stage 3: ``{"b": {survivor: share}, "sk": {dropped: share}}`` (base64), never both for one."""
    payload = _expect(pending, payload, "unmask", {"survivors", "dropped"})
    survivors, dropped = payload["survivors"], payload["dropped"]
    if not (isinstance(survivors, list) and isinstance(dropped, list)) or len(set(survivors)) != len(survivors) \
            or len(set(dropped)) != len(dropped) or set(survivors) & set(dropped) \
            or set(survivors) | set(dropped) != set(pending.u1):
        raise SecAggRefused("survivors and dropped must split the members that shared, each named once")
    if pending.hospital not in survivors or len(survivors) < pending.threshold:
        raise SecAggRefused(f"{len(survivors)} survivors is below the threshold {pending.threshold} (or omits this hospital)")
    pending.stage = "done"
    return {"b": {m: b64(pending.held[m][0]) for m in survivors}, "sk": {m: b64(pending.held[m][1]) for m in dropped}}
