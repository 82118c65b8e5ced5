"""The Dify simulator in its own process, for benchmarks: the client's CPU and memory are then measured alone.

Prints `PORT <n>` on stdout once serving, then answers one command per stdin line with one JSON line:
`stats` (run requests by outcome/status, server-side peak concurrency, TCP connections seen), `reset`, `quit`.
Connections are counted as distinct client (host, port) pairs seen by a wrapping ASGI middleware, so the simulator
itself is not modified.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import Counter
from typing import Any

from runner.simulator import RUN_ENDPOINTS, SimConfig, SimulatorServer, create_app, parse_latency


class ConnectionCounter:
    """ASGI middleware: remembers each client (host, port) that sent a request, i.e. each TCP connection."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.clients: set[tuple[str, int]] = set()
        self.requests = 0
        self._lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and scope.get("client"):
            with self._lock:
                self.clients.add(tuple(scope["client"]))  # type: ignore[arg-type]
                self.requests += 1
        await self.app(scope, receive, send)

    def reset(self) -> None:
        with self._lock:
            self.clients = set()
            self.requests = 0


def stats(server: SimulatorServer, counter: ConnectionCounter) -> dict[str, Any]:
    records = list(server.sim.requests)
    runs = [r for r in records if r.endpoint in RUN_ENDPOINTS]
    return {
        "run_requests": len(runs),
        "all_requests": counter.requests,
        "outcomes": dict(Counter(str(r.outcome) for r in runs)),
        "status_codes": dict(Counter(str(r.status_code) for r in runs)),
        "rejected": sum(1 for r in runs if r.outcome in ("429", "400")),
        "max_in_flight": server.sim.max_in_flight,
        "connections": len(counter.clients),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", default="0")
    parser.add_argument("--max-active", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="workflow")
    parser.add_argument("--linger", type=float, default=0.0, help="seconds a finished stream stays open")
    args = parser.parse_args()
    config = SimConfig(app_mode=args.mode, latency=parse_latency(args.latency), max_active_requests=args.max_active,
                       seed=args.seed, linger_after_terminal=args.linger)
    server = SimulatorServer(config)
    counter = ConnectionCounter(create_app(server.sim))
    server.sim._app = counter  # type: ignore[assignment]  # the wrapped app is what SimulatorServer serves
    server.start()
    print(f"PORT {server.port}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "stats":
            print(json.dumps(stats(server, counter)), flush=True)
        elif command == "reset":
            server.sim.reset_records()
            counter.reset()
            print("{}", flush=True)
        elif command == "quit":
            break
    server.stop()


if __name__ == "__main__":
    main()
