"""A/B two checkouts of `runner` on the client-overhead scenario (zero latency, concurrency 64, streaming).

    git archive HEAD runner | tar -x -C /tmp/a      # and a patched copy in /tmp/b
    python bench/ab.py /tmp/a /tmp/b --rows 5000 --repeats 5

Runs alternate (a, b, a, b, ...) against a fresh simulator each, so drift of the machine hits both alike. Prints the
median CPU ms/row and send-phase rows/s of each, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="folder holding runner/ (baseline)")
    parser.add_argument("b", type=Path, help="folder holding runner/ (candidate)")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", default="0")
    parser.add_argument("--mode", default="streaming")
    parser.add_argument("--data", type=Path, default=Path("/tmp/dify-batch-bench"))
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith("DIFY_")}
    base["DIFY_API_KEY"] = bench.KEY
    (args.data / "out").mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for attempt in range(args.repeats):
        for name, tree in (("a", args.a), ("b", args.b)):
            ctx = bench.Context(False, args.data, args.data, {**base, "PYTHONPATH": str(tree.resolve())})
            source = bench.dataset(ctx, args.rows)
            with bench.Sim(ctx, args.latency) as sim:
                found = bench.client(ctx, sim, source, concurrency=args.concurrency, mode=args.mode)
            results[name].append(found)
            print(f"{attempt + 1}/{args.repeats} {name}: {found['cpu_ms_per_row']:.3f} ms/row, "
                  f"{found['phase_rate']:.0f} rows/s, {found['server']['connections']} connections", file=sys.stderr)
    cpu = {n: statistics.median(r["cpu_ms_per_row"] for r in rs) for n, rs in results.items()}
    rate = {n: statistics.median(r["phase_rate"] for r in rs) for n, rs in results.items()}
    for name in ("a", "b"):
        print(f"{name}: {cpu[name]:.3f} ms/row, {rate[name]:.0f} rows/s (median of {args.repeats})")
    print(f"b/a: CPU {cpu['b'] / cpu['a']:.3f}×, rows/s {rate['b'] / rate['a']:.3f}×")


if __name__ == "__main__":
    main()
