"""``carefl-data check``: a hospital checks its datalist before it joins a federation.

    carefl-data check --data-path /data/datalist.json task=seg3d task.num_classes=3 \\
        data.preprocess=ct 'data.spatial_size=[96,96,96]' [--cache-dir /var/lib/carefl/data-cache]

Every entry is read and preprocessed exactly as in training (same readers, checks and preset),
so what passes here loads in a round. It prints the data card (:mod:`carefl.data.card`) with the
first problems, each naming the file and the fix, and keeps the card beside the prepared
images (``<cache-dir>/data_card.json``); the prepared images stay cached, so the first round
does not prepare them again when it uses the same cache dir (the hospital's ``cache-dir``,
``<state-dir>/data-cache`` by default). Overrides are the federation's Hydra overrides for the
task and data (``data=decathlon`` is implied). Exit status: 0 when every entry is usable, 1 when
some are not, 2 for a command that cannot run (bad override, missing datalist).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from carefl.errors import CareFLError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carefl-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="read, check and preprocess every datalist entry; print the data card")
    check.add_argument("--data-path", required=True, help="the hospital's datalist JSON (its data-path)")
    check.add_argument("--cache-dir", default=None,
                       help="where prepared images and the card are kept (default: ./carefl-data-cache)")
    check.add_argument("overrides", nargs="*", help="Hydra overrides: task=..., data.preprocess=..., data.spatial_size=...")
    args = parser.parse_args(argv)
    try:
        from carefl.config import compose_config

        cfg = compose_config(["data=decathlon", *args.overrides])
        from omegaconf import OmegaConf

        from carefl.data.card import format_card
        from carefl.data.decathlon import CARD_FILE, prepare_datalist

        plain = OmegaConf.to_container(cfg, resolve=True)
        cache = Path(args.cache_dir or "carefl-data-cache").expanduser().resolve()
        prepared = prepare_datalist(plain["data"], plain["task"], int(plain["seed"]), "this hospital",
                                    args.data_path, cache)
    except CareFLError as err:
        print(f"carefl-data check: {err}", file=sys.stderr)
        return 2
    print(format_card(prepared.card))
    print(f"card saved to {cache / CARD_FILE}; prepared images cached in {cache}")
    return 1 if prepared.problems else 0


if __name__ == "__main__":
    sys.exit(main())
