"""`dify-batch inspect`: what the app behind a key expects, and a ready-to-edit job file with a guessed mapping."""

from __future__ import annotations

import asyncio
import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from .dify import DifyClient
from .errors import NotFoundError
from .models import AppParameters, InputDef

MODE_TO_APP_TYPE = {"workflow": "workflow", "completion": "completion", "chat": "chat", "advanced-chat": "chat",
                    "agent-chat": "chat", "agent": "chat"}


@dataclass(frozen=True)
class AppDescription:
    name: str
    mode: str
    params: AppParameters

    @property
    def app_type(self) -> str:
        return MODE_TO_APP_TYPE.get(self.mode, "workflow")

    def lines(self) -> list[str]:
        out = [f"App: {self.name or '(unnamed)'}  mode: {self.mode or 'unknown'}  -> --app-type {self.app_type}"]
        if not self.params.inputs:
            out.append("Inputs: none")
        for item in self.params.inputs:
            out.append("  " + describe_input(item))
        return out


def describe_input(item: InputDef) -> str:
    parts = [item.variable, item.type, "required" if item.required else "optional"]
    if item.max_length:
        parts.append(f"max {item.max_length} {'files' if item.is_file else 'chars'}")
    if item.options:
        parts.append("options: " + " | ".join(item.options))
    if item.allowed_file_types:
        parts.append("file types: " + ", ".join(item.allowed_file_types))
    return "  ".join(parts)


def describe_app(base_url: str, api_key: str) -> AppDescription:
    return asyncio.run(_describe(base_url, api_key))


async def _describe(base_url: str, api_key: str) -> AppDescription:
    async with DifyClient(base_url, api_key, timeout=30.0) as client:
        params = await client.parameters()
        try:
            info = await client.info()
        except NotFoundError:
            info = {}
    return AppDescription(str(info.get("name") or ""), str(info.get("mode") or ""), params)


def _q(value: object) -> str:
    """A TOML basic string (JSON's escapes are valid TOML); Chinese names stay readable."""
    return json.dumps(value, ensure_ascii=False)


def guess_mapping(inputs: tuple[InputDef, ...], columns: list[str]) -> dict[str, str | None]:
    """Each input's best column: same name, same name ignoring case/underscores, then the closest name."""
    normal = {_norm(c): c for c in columns}
    guessed: dict[str, str | None] = {}
    for item in inputs:
        match = item.variable if item.variable in columns else normal.get(_norm(item.variable))
        if match is None:
            close = difflib.get_close_matches(_norm(item.variable), list(normal), n=1, cutoff=0.6)
            match = normal[close[0]] if close else None
        if match is None:  # product_name <- name, text <- input_text
            parts = [c for n, c in normal.items() if n and (n in _norm(item.variable) or _norm(item.variable) in n)]
            match = max(parts, key=len) if parts else None
        guessed[item.variable] = match
    return guessed


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


def job_file_text(
    app: AppDescription, base_url: str, api_key_env: str, input_path: Path | None, columns: list[str]
) -> str:
    """A commented job file; `input_path` as it should be written (relative to the job file's folder)."""
    mapping = guess_mapping(app.params.inputs, columns)
    lines = [
        f"# Job file for {app.name or 'the app'} ({app.mode or 'unknown'} app) written by `dify-batch inspect`.",
        "# Paths are relative to this file's folder. The API key is read from the environment, never from here.",
        f"input = {_q(input_path.as_posix() if input_path else 'data.csv')}",
        'output = "out.csv"',
        f"base_url = {_q(base_url)}",
        f"api_key_env = {_q(api_key_env)}",
        f'app_type = "{app.app_type}"',
        'response_mode = "streaming"',
        "concurrency = 8",
        "",
        "[map]  # app input = input column",
    ]
    for item in app.params.inputs:
        column = mapping.get(item.variable)
        note = f"  # {describe_input(item)}"
        lines.append(f"{item.variable} = {_q(column)}{note}" if column else f"# {item.variable} = \"?\"{note}")
    if app.app_type == "chat":
        lines.insert(9, 'query_column = "query"  # the column holding the user message')
    return "\n".join(lines) + "\n"


def table_columns(path: Path) -> list[str]:
    from .inputs import open_table

    return list(open_table(path).columns)
