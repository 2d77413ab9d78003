"""``python -m lightning_hpsgd.bench``: the project's benchmarks, printed as ratios measured side by side."""

from __future__ import annotations

import argparse

from lightning_hpsgd.bench.overlap import measure_overlap, report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_hpsgd.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=False)
    overlap = sub.add_parser("overlap", help="wait per round over all-reduce time (0 = communication fully hidden)")
    overlap.add_argument("--world-size", type=int, default=2)
    overlap.add_argument("--hidden", type=int, default=512, help="MLP width; parameters grow as 2*hidden^2")
    overlap.add_argument("--rounds", type=int, default=30)
    overlap.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    if args.bench in (None, "overlap"):
        result = measure_overlap(
            world_size=getattr(args, "world_size", 2),
            hidden=getattr(args, "hidden", 512),
            rounds=getattr(args, "rounds", 30),
            batch=getattr(args, "batch", 256),
        )
        print("HPSGD overlap benchmark (gloo on loopback, CPU, sync_every=1)")
        print(report(result))


if __name__ == "__main__":
    main()
