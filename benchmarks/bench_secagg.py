"""What secure aggregation costs: server and per-hospital CPU time of secure bucketed median
vs plain median at the same n, and the bytes each hospital sends.

The protocol's compute exactly as a round runs it (:mod:`carefl.secagg.member` at every
hospital, :class:`carefl.secagg.coordinator.Bucket` at the server, then the robust rule over
the bucket means), without a transport: messages are the dicts the transports carry.
Server time = routing + reconstruction + unmasking of every bucket + the rule over bucket
means; plain = the rule over the n clear updates. Hospital time = advertise (quantise, keys)
+ share + mask + unmask, the slowest hospital's. CPU time (``time.process_time``), one
thread, the median of --repeat interleaved runs (secure, plain, secure, ...); the machine's
load average is printed with the figures.

Cases: 10 hospitals with the default UNet (conf/model/unet.yaml) and 20 hospitals with
DenseNet121-size updates (7,033,282 floats), bucket size 3 (buckets of 3 or 4), f=1.

Usage:  python benchmarks/bench_secagg.py [--tiny] [--repeat 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from carefl.receipts import SigningKey
from carefl.robust import build_aggregator
from carefl.secagg import coordinator, member

DENSENET121_FLOATS = 7_033_282


def unet_floats() -> int:
    from carefl.config import compose_config
    from carefl.models import build_model

    model = build_model(compose_config([]))
    return sum(v.numel() for v in model.state_dict().values() if torch.is_floating_point(v))


def secure_round(keys, updates: dict[str, torch.Tensor], size: int, rule, bound: float = 10.0, bits: int = 22):
    """One securely aggregated round; returns (server seconds, slowest hospital seconds, mean
    bytes a hospital sends, the aggregate)."""
    names, d = list(updates), next(iter(updates.values())).numel()
    hospital, sent, server = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0), [0.0]

    def at(name, fn, *args):  # hospital `name` computes
        start = time.process_time()
        out = fn(*args)
        hospital[name] += time.process_time() - start
        return out

    def served(fn, *args):  # the server computes
        start = time.process_time()
        out = fn(*args)
        server[0] += time.process_time() - start
        return out

    pending, adverts = {}, {}
    for n in names:
        pending[n], adverts[n] = at(n, member.advertise, keys[n], "ab" * 32, 1, n, updates[n], bound, bits)
        sent[n] += len(json.dumps(adverts[n]))
    buckets = served(lambda: [coordinator.Bucket("ab" * 32, 1, {m: adverts[m] for m in ms}, d, bound, bits)
                              for ms in coordinator.plan_buckets(names, size, seed=1)])
    for b in buckets:
        for m, req in served(b.share_requests).items():
            reply = at(m, member.share, pending[m], req, 3, bits)
            sent[m] += len(json.dumps(reply))
            served(b.take_shares, m, reply)
    for b in buckets:
        for m, req in served(b.mask_requests).items():
            y = at(m, member.mask, pending[m], req)
            sent[m] += y.nbytes
            served(b.take_masked, m, torch.from_numpy(y.view(np.int32)))
    means = []
    for b in buckets:
        for m, req in served(b.unmask_requests).items():
            reply = at(m, member.unmask, pending[m], req)
            sent[m] += len(json.dumps(reply))
            served(b.take_unmask, m, reply)
        means.append(served(b.result)[0])
    result = served(lambda: rule(torch.stack(means), torch.ones(len(means))))
    return server[0], max(hospital.values()), statistics.mean(sent.values()), result.update


def plain_round(updates: dict[str, torch.Tensor], rule) -> float:
    start = time.process_time()
    rows = torch.stack(list(updates.values()))
    rule(rows, torch.ones(len(updates)))
    return time.process_time() - start


def run_case(label: str, n: int, d: int, size: int, repeat: int, keys) -> dict:
    gen = torch.Generator().manual_seed(0)
    updates = {f"h{i}": torch.randn(d, generator=gen) * 1e-3 for i in range(n)}
    rule = build_aggregator({"name": "median", "f": 1, "rule": {"name": "median"}, "pre": [], "server_opt": {"name": "sgd", "lr": 1.0}})
    secure, plain, hospital = [], [], []
    sent = 0.0
    for _ in range(repeat):  # interleaved: a burst of load hits both alike
        s, h, sent, _ = secure_round(keys, updates, size, rule)
        secure.append(s)
        hospital.append(h)
        plain.append(plain_round(updates, rule))
    row = {
        "case": label, "n": n, "d": d, "bucket_size": size, "buckets": coordinator.buckets_needed(n, size),
        "secure_server_s": statistics.median(secure), "plain_median_s": statistics.median(plain),
        "ratio": statistics.median(secure) / statistics.median(plain),
        "hospital_s": statistics.median(hospital),
        "hospital_sends_bytes": sent, "plain_update_bytes": 4 * d,
        "load_avg_1m": os.getloadavg()[0],
    }
    print(f"{label:28s} n={n:3d} d={d:>9,d} buckets={row['buckets']}: secure server {row['secure_server_s']:.3f} s, "
          f"plain median {row['plain_median_s']:.3f} s, ratio {row['ratio']:.2f}; slowest hospital "
          f"{row['hospital_s']:.3f} s; a hospital sends {sent / 1e6:.2f} MB (float32 update {4 * d / 1e6:.2f} MB); "
          f"load {row['load_avg_1m']:.2f}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke run: small n and d")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        keys = {f"h{i}": SigningKey.load_or_create(Path(tmp) / f"h{i}.pem") for i in range(20)}
        cases = [("tiny", 9, 5000, 3)] if args.tiny else [
            ("default UNet, 10 hospitals", 10, unet_floats(), 3), ("DenseNet121 size, 20", 20, DENSENET121_FLOATS, 3)]
        rows = [run_case(label, n, d, size, 1 if args.tiny else args.repeat, keys) for label, n, d, size in cases]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
