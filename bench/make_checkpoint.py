"""Build the checkpoint of a finished job without sending its runs, so a 1,000,000-row resume can be measured in minutes.

Uses dify-batch's own code for everything but HTTP: the spec as `dify-batch run` builds it, /parameters from the
simulator, the mapping and fingerprint of `runner.job`, `register_rows` of `runner.plan`, and `Checkpoint.apply_batch`
(what the scheduler's writer thread calls) with the outputs the simulator would have returned for each row.
The fingerprint names the simulator's base URL: resume against the same simulator (same port).
Prints one JSON line: rows, seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any


async def app_parameters(spec: Any, key: str) -> tuple[Any, Any]:
    """The app's parameters, and the (closed) client whose normalised base URL the fingerprint records."""
    from runner.job import inspect_app, make_client

    async with make_client(spec, key) as client:
        params, _ = await inspect_app(client, spec)
    return params, client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--key-column")
    parser.add_argument("--limit", type=int, help="only the first N rows (rerun with the same --limit)")
    args = parser.parse_args()

    from runner.checkpoint import Checkpoint
    from runner.job import _mapping, fingerprint, open_input
    from runner.mapping import build_inputs
    from runner.plan import iter_keyed_batches, register_rows
    from runner.simulator import RUN_PRICE, workflow_outputs
    from runner.spec import build_spec

    started = time.monotonic()
    flags = {"input": args.input, "output": args.output, "base_url": args.base_url, "key_column": args.key_column,
             "limit": args.limit}
    spec = build_spec(None, flags, env={})
    key = os.environ.get("DIFY_API_KEY", "app-simulator-key")
    params, client = asyncio.run(app_parameters(spec, key))
    reader = open_input(spec)
    mapping = _mapping(spec, reader, params)
    rows = 0
    with Checkpoint.open(spec.state_path, fingerprint(spec, mapping, client), fresh=True) as store:
        register_rows(reader, spec, mapping, store)
        for batch in iter_keyed_batches(reader, spec, mapping):
            states = store.get_rows([item.key for item in batch])
            done = [succeeded(states[item.key], workflow_outputs(build_inputs(item.row, mapping, params)), RUN_PRICE)
                    for item in batch]
            store.apply_batch([], done)
            rows += len(batch)
        store.set_meta(f"end_user:{spec.user}", "1")
    print(json.dumps({"rows": rows, "seconds": round(time.monotonic() - started, 2)}))


def succeeded(state: Any, outputs: dict[str, Any], price: str) -> Any:
    return replace(state, status="succeeded", outputs=outputs, attempts=1, elapsed_s=0.01,
                   workflow_run_id=str(uuid.uuid4()), task_id=str(uuid.uuid4()), total_tokens=120,
                   total_price=float(price), currency="USD")


if __name__ == "__main__":
    main()
