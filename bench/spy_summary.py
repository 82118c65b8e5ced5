"""Summarise a py-spy `--format raw` profile: where the client's active samples go.

`self` = samples whose innermost frame is that function; `inclusive` = samples with the function anywhere on the stack;
`component` = the innermost frame's package (runner module, httpx, aiohttp, asyncio, sqlite/json C calls, ...).
"""

from __future__ import annotations

import re
import sys
from collections import Counter

_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^:()]+)(?::\d+)?\)$")


def parse(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                stacks.append((stack.split(";"), int(count)))
    return stacks


def label(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if not match:
        return frame, "?"
    return f"{match['name']} ({match['file']})", match["file"]


def component(path: str) -> str:
    parts = path.split("/")
    if parts[0] == "runner" or "runner" in parts[:-1]:
        return "runner/" + parts[-1]
    for name in ("httpx_aiohttp", "httpx", "aiohttp", "tenacity", "sqlite3", "json", "asyncio", "tqdm", "pyarrow",
                 "multidict", "yarl", "threading", "queue", "selectors", "ssl", "uuid", "dataclasses", "socket",
                 "codecs", "decimal", "h11", "anyio"):
        if name in parts or parts[-1].startswith(name):
            return name
    return parts[-1] if len(parts) < 2 else parts[-2] + "/" + parts[-1]


def summarise(path: str, top: int = 20) -> str:
    stacks = parse(path)
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    components: Counter[str] = Counter()
    for frames, count in stacks:
        name, file = label(frames[-1])
        own[name] += count
        components[component(file)] += count
        for seen in {label(f)[0] for f in frames}:
            inclusive[seen] += count
    lines = [f"py-spy: {total} active samples (all threads)", "", "self %  function (innermost frame)"]
    lines += [f"{100 * n / total:5.1f}  {name}" for name, n in own.most_common(top)]
    lines += ["", "incl %  function (anywhere on the stack)"]
    lines += [f"{100 * n / total:5.1f}  {name}" for name, n in inclusive.most_common(top + 25)
              if not name.startswith(("<module>", "main (", "run (", "Runner.run", "BaseEventLoop.run_"))][:top]
    lines += ["", "self %  component of the innermost frame"]
    lines += [f"{100 * n / total:5.1f}  {name}" for name, n in components.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20))
