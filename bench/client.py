"""dify-batch's `run_job`, driven exactly as `dify-batch run` drives it, with the scheduling phase timed.

The phase runs from `on_start` (rows registered, nothing sent yet) to the last `on_progress` callback (last row's result
durable), so CPU per row excludes interpreter start-up, input registration and output export; those are in `total_*`.
`--progress` drives the CLI's own tqdm bar (forced on, written to stderr); `--profile` saves cProfile stats.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any


class Phase:
    def __init__(self, bar: Any = None) -> None:
        self.bar = bar
        self.start_wall = self.start_cpu = self.end_wall = self.end_cpu = 0.0
        self.todo = self.done = 0

    def on_start(self, rows: int, todo: int) -> None:
        self.todo = todo
        if self.bar is not None:
            self.bar.start(rows, todo)
        self.start_wall, self.start_cpu = time.monotonic(), time.process_time()

    def on_progress(self, progress: Any) -> None:
        if self.bar is not None:
            self.bar.update(progress)
        self.done = progress.done
        if self.done >= self.todo:  # read the CPU clock once, at the last row: it is not free under load
            self.end_wall, self.end_cpu = time.monotonic(), time.process_time()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--response-mode", default="streaming")
    parser.add_argument("--key-column")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--progress", action="store_true", help="drive the CLI's tqdm bar (forced on)")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of the whole run here")
    parser.add_argument("--commit-delay", type=float, default=0.0,
                        help="hold the checkpoint connection this many extra seconds per commit (a slow disk's fsync)")
    return parser.parse_args()


def slow_commits(delay: float) -> None:
    """Make every checkpoint commit hold the connection `delay` s longer, as a slow (network) disk's fsync would."""
    from runner.checkpoint import Checkpoint

    original = Checkpoint.apply_batch

    def apply_batch(self: Any, started: Any, states: Any) -> None:
        original(self, started, states)
        with self._lock:
            time.sleep(delay)

    Checkpoint.apply_batch = apply_batch  # type: ignore[method-assign]


def main() -> None:
    started_wall, started_cpu = time.monotonic(), time.process_time()
    args = parse_args()
    from runner.job import run_job
    from runner.spec import build_spec

    flags = {"input": args.input, "output": args.output, "base_url": args.base_url, "concurrency": args.concurrency,
             "response_mode": args.response_mode, "key_column": args.key_column, "limit": args.limit, "fresh": True}
    spec = build_spec(None, flags, env={})
    if args.commit_delay:
        slow_commits(args.commit_delay)
    bar = None
    if args.progress:
        from runner.cli import ProgressBar

        bar = ProgressBar(enabled=True)
    phase = Phase(bar)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    summary = run_job(spec, on_progress=phase.on_progress, on_start=phase.on_start,
                      api_key=os.environ.get("DIFY_API_KEY", "app-simulator-key"))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    if bar is not None:
        bar.close()
    if phase.done < phase.todo or not phase.end_wall:  # stopped early: the phase ends with run_job
        phase.end_wall, phase.end_cpu = time.monotonic(), time.process_time()
    print(json.dumps({
        "rows": phase.todo, "done": phase.done,
        "phase_wall_s": phase.end_wall - phase.start_wall, "phase_cpu_s": phase.end_cpu - phase.start_cpu,
        "total_wall_s": time.monotonic() - started_wall, "total_cpu_s": time.process_time() - started_cpu,
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "summary": summary.to_dict(),
    }), file=sys.stdout)


if __name__ == "__main__":
    main()
