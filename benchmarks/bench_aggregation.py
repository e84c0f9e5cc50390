"""Speed of carefl.robust's rules vs Flower 1.41's own robust aggregation, same inputs.

n random updates shaped like DenseNet121's float state dict (MONAI, 2-D, 1 channel in,
2 out: 7,033,282 floats in 606 float tensors, running statistics included), f Byzantine tolerated.

Flower side: the pure aggregation code of flwr.serverapp.strategy, called directly
(the ``aggregate_train`` bodies minus Message handling and logging):
  FedMedian      per layer ``np.median(np.stack(layers), axis=0)`` (inline in aggregate_train)
  FedTrimmedAvg  per layer ``fedtrimmedavg.trim_mean(np.stack(layers), beta=f/n)``
  Krum/MultiKrum ``multikrum.select_multikrum(RecordDicts, f, m)`` + ``aggregate_arrayrecords``
  Bulyan         ``select_multikrum(..., theta=n-2f)`` + per-layer ``np.median`` +
                 ``bulyan.aggregate_n_closest_weights(..., beta=theta-2f)`` (one-shot; equal
                 to the published recursive selection on this input)
Flower's median / trimmed mean get the layers as numpy views (no deserialisation counted);
Krum, MultiKrum and Bulyan take RecordDicts and deserialise inside, as in a real round.

CareFL side: the rule on the float32 (n, d) matrix. Building that matrix from the state dicts
(``flatten_updates``, once per round whatever the rule) is timed separately, and a second
speed-up column charges it to every rule, as Flower's own stacking is charged to Flower.
Times are the median of --repeat runs, single-threaded by default (set --threads to change it
for both libraries: torch intra-op threads and BLAS threads).

Usage:  python benchmarks/bench_aggregation.py [--tiny] [--n 20] [--f 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke run: n=7, f=1, a small model")
    p.add_argument("--n", type=int, default=20, help="hospitals (updates)")
    p.add_argument("--f", type=int, default=2, help="Byzantine hospitals tolerated")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per rule (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_aggregation.json")
    return p.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights  # noqa: E402
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean  # noqa: E402
from flwr.serverapp.strategy.multikrum import select_multikrum  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from omegaconf import OmegaConf  # noqa: E402

from carefl.config import compose_config  # noqa: E402
from carefl.robust import RULES, build_aggregator, flatten_updates  # noqa: E402


def layer_shapes(tiny: bool) -> list[tuple[int, ...]]:
    """Float state-dict shapes of MONAI's DenseNet121 (2-D, 1 -> 2), or of a small net."""
    from monai.networks.nets import DenseNet121

    if tiny:
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 2))
    else:
        net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    return [tuple(v.shape) for v in net.state_dict().values() if v.is_floating_point()]


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    n, f = (7, 1) if ARGS.tiny else (ARGS.n, ARGS.f)
    shapes = layer_shapes(ARGS.tiny)
    sizes = [int(np.prod(s)) for s in shapes]
    d = sum(sizes)
    gen = torch.Generator().manual_seed(ARGS.seed)
    # hospital i's spread grows with i and the f outliers sit at +1, +2, ...: Krum scores are
    # well apart (no float-rounding near-ties), and the outliers are far from each other, so
    # the recursive Bulyan (CareFL, Flower's legacy aggregate_bulyan) and Flower 1.41's
    # one-shot Bulyan pick the same updates
    x = torch.randn(n, d, generator=gen) * (1e-3 * (1 + torch.arange(n) / n))[:, None]
    x[:f] += torch.arange(1, f + 1, dtype=x.dtype)[:, None]

    # the same numbers as Flower sees them: per hospital, one numpy view per layer
    bounds = np.cumsum([0, *sizes])
    layers = [[x[i, bounds[k] : bounds[k + 1]].numpy().reshape(shapes[k]) for k in range(len(shapes))] for i in range(n)]
    records = [
        RecordDict({"arrays": ArrayRecord(numpy_ndarrays=ls), "metrics": MetricRecord({"num-examples": 100})})
        for ls in layers
    ]
    flat = lambda arrs: np.concatenate([a.ravel() for a in arrs])  # noqa: E731

    def flwr_median():
        return flat([np.median(np.stack(ls), axis=0) for ls in zip(*layers)])

    def flwr_trimmed():
        return flat([trim_mean(np.stack(ls), f / n) for ls in zip(*layers)])

    def flwr_multikrum(m):
        def run():
            chosen = select_multikrum(records, num_malicious_nodes=f, num_nodes_to_select=m)
            return flat(aggregate_arrayrecords(chosen, "num-examples").to_numpy_ndarrays())
        return run

    def flwr_bulyan():
        theta = n - 2 * f
        chosen = select_multikrum(records, num_malicious_nodes=f, num_nodes_to_select=theta)
        sel = [c["arrays"].to_numpy_ndarrays() for c in chosen]
        med = [np.median(arr, axis=0) for arr in zip(*sel)]
        return flat(aggregate_n_closest_weights(med, sel, theta - 2 * f))

    flower = {
        "median": flwr_median,
        "trimmed_mean": flwr_trimmed,
        "krum": flwr_multikrum(1),
        "multikrum": flwr_multikrum(n - f),
        "bulyan": flwr_bulyan,
    }
    shipped = ("robust", "cosine_filter")  # pipelines whose rule needs the pre-aggregators of their file
    rules = {name: {"name": name} for name in RULES if name not in shipped}
    rules["centered_clip"] = {"name": "centered_clip", "tau": 1.0, "iters": 3}
    pipelines = dict(rules)
    for name in shipped:
        conf = OmegaConf.to_container(compose_config(f"strategy={name}").strategy, resolve=True)
        pipelines[f"{name} (conf/strategy)"] = {**conf["rule"], "pre": conf["pre"]}

    print(f"n={n} hospitals, d={d:,} floats ({len(shapes)} tensors), f={f}, threads={ARGS.threads}, repeat={ARGS.repeat}")
    global_state = {f"p{k}": torch.zeros(s) for k, s in enumerate(shapes)}
    local_states = [{f"p{k}": torch.from_numpy(a) for k, a in enumerate(ls)} for ls in layers]
    t_flatten, _ = timed(lambda: flatten_updates(local_states, global_state), ARGS.repeat)
    print(f"flatten_updates (state dicts -> (n, d) matrix): {t_flatten:.3f} s (once per round, shared by all rules)\n")

    rows = []
    header = f"{'rule':<31}{'carefl s':>10}{'flower s':>10}{'speed-up':>10}{'+flatten':>10}  agree (max |diff|)"
    print(header + "\n" + "-" * len(header))
    for name, spec in pipelines.items():
        strategy = {"f": f, "rule": {k: v for k, v in spec.items() if k != "pre"}, "pre": spec.get("pre", []),
                    "server_opt": {"name": "sgd"}}
        agg = build_aggregator(strategy)
        t_ours, res = timed(lambda: agg(x, [100] * n), ARGS.repeat)
        row = {"rule": name, "carefl_s": t_ours, "flower_s": None, "speedup": None, "speedup_with_flatten": None,
               "agree": None, "max_abs_diff": None}
        if name in flower:
            t_flwr, ref = timed(flower[name], ARGS.repeat)
            ours = res.update.numpy()
            row.update(flower_s=t_flwr, speedup=t_flwr / t_ours, speedup_with_flatten=t_flwr / (t_ours + t_flatten),
                       agree=bool(np.allclose(ours, ref, rtol=1e-5, atol=1e-7)),
                       max_abs_diff=float(np.abs(ours - ref).max()))
        rows.append(row)
        if row["flower_s"] is None:
            print(f"{name:<31}{t_ours:>10.3f}{'-':>10}{'-':>10}{'-':>10}")
        else:
            print(f"{name:<31}{t_ours:>10.3f}{row['flower_s']:>10.3f}{row['speedup']:>9.1f}x"
                  f"{row['speedup_with_flatten']:>9.1f}x  "
                  f"{row['agree']} ({row['max_abs_diff']:.1e})")

    ARGS.out.parent.mkdir(parents=True, exist_ok=True)
    ARGS.out.write_text(json.dumps({"n": n, "d": d, "f": f, "threads": ARGS.threads, "repeat": ARGS.repeat,
                                    "tiny": ARGS.tiny, "flatten_s": t_flatten, "rows": rows}, indent=2))
    print(f"\nwrote {ARGS.out}")
    if not all(r["agree"] for r in rows if r["agree"] is not None):
        sys.exit("results disagree with Flower's on a shared rule")


if __name__ == "__main__":
    main()
