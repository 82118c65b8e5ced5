"""The loops people write by hand, measured against dify-batch on the same simulator.

`minimal`: asyncio + one aiohttp ClientSession + a semaphore; streaming parses only the terminal SSE frame (the strongest
simple peer). `wave`: the same requests in groups of `concurrency`, the next group starting when the whole group is done
(Dify's web batch). `sequential`: a plain `requests` loop, one row after another.
Prints one JSON line: rows, ok, wall_s, cpu_s (this process, measured around the loop only).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import time
from typing import Any

TERMINAL = (b'"event":"workflow_finished"', b'"event": "workflow_finished"', b'"event":"error"', b'"event": "error"')


def read_rows(path: str, limit: int | None) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return rows[:limit] if limit else rows


def body(row: dict[str, str], mode: str, user: str) -> dict[str, Any]:
    return {"inputs": {"text": row["text"]}, "response_mode": mode, "user": user}


async def one_row(session: Any, url: str, payload: dict[str, Any]) -> dict[str, Any] | None:
    import aiohttp

    for attempt in range(3):
        try:
            return await _post(session, url, payload)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # uvicorn drops keep-alive connections idle > 5 s; the POST never reached the app, so send it again
            if attempt == 2:
                raise
    return None


async def _post(session: Any, url: str, payload: dict[str, Any]) -> dict[str, Any] | None:
    async with session.post(url, json=payload) as response:
        if response.status != 200:
            await response.read()
            return None
        if payload["response_mode"] == "blocking":
            return dict(await response.json())
        terminal = None
        async for line in response.content:  # read to EOF so the connection goes back to the pool
            if terminal is None and line.startswith(b"data:") and any(t in line for t in TERMINAL):
                terminal = json.loads(line[5:])
        return terminal


async def run_async(args: argparse.Namespace, rows: list[dict[str, str]]) -> tuple[int, float, float]:
    import aiohttp

    url = args.base_url.rstrip("/") + "/workflows/run"
    headers = {"Authorization": f"Bearer {args.api_key}"}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        semaphore = asyncio.Semaphore(args.concurrency)

        async def guarded(row: dict[str, str]) -> dict[str, Any] | None:
            async with semaphore:
                return await one_row(session, url, body(row, args.response_mode, "peer"))

        started, cpu = time.monotonic(), time.process_time()
        # Row 0 alone first, as dify-batch does: the end user then exists before the burst.
        results: list[Any] = [await one_row(session, url, body(rows[0], args.response_mode, "peer"))]
        rows = rows[1:]
        if args.wave:
            for start in range(0, len(rows), args.concurrency):
                group = rows[start : start + args.concurrency]
                results += await asyncio.gather(*(one_row(session, url, body(r, args.response_mode, "peer"))
                                                  for r in group))
        else:
            results += await asyncio.gather(*(guarded(row) for row in rows))
        wall, cpu = time.monotonic() - started, time.process_time() - cpu
    ok = sum(1 for r in results if r is not None and _succeeded(r))
    return ok, wall, cpu


def _succeeded(result: dict[str, Any]) -> bool:
    data = result.get("data") if isinstance(result.get("data"), dict) else {}
    return bool(data.get("status") == "succeeded")


def run_sequential(args: argparse.Namespace, rows: list[dict[str, str]]) -> tuple[int, float, float]:
    import requests

    url = args.base_url.rstrip("/") + "/workflows/run"
    headers = {"Authorization": f"Bearer {args.api_key}"}
    ok = 0
    with requests.Session() as session:
        started, cpu = time.monotonic(), time.process_time()
        for row in rows:
            response = session.post(url, json=body(row, "blocking", "peer"), headers=headers, timeout=60)
            ok += response.status_code == 200 and _succeeded(response.json())
        return ok, time.monotonic() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", default="app-simulator-key")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--response-mode", choices=["streaming", "blocking"], default="streaming")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--wave", action="store_true")
    parser.add_argument("--sequential", action="store_true")
    args = parser.parse_args()
    rows = read_rows(args.input, args.limit)
    ok, wall, cpu = run_sequential(args, rows) if args.sequential else asyncio.run(run_async(args, rows))
    print(json.dumps({"rows": len(rows), "ok": ok, "wall_s": wall, "cpu_s": cpu}))


if __name__ == "__main__":
    main()
