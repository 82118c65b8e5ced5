"""Plain data shared by the client, the scheduler and the writers: app input definitions and run results.

Frozen dataclasses only; no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

APP_TYPES = ("workflow", "chat", "completion")
TERMINAL_OK = "succeeded"


@dataclass(frozen=True)
class InputDef:
    """One variable of the app's Start node / input form, as `/parameters` describes it."""

    variable: str
    type: str  # text-input | paragraph | select | number | file | file-list | checkbox | json_object | external_data_tool
    label: str = ""
    required: bool = False
    max_length: int | None = None
    options: tuple[str, ...] = ()
    allowed_file_types: tuple[str, ...] = ()
    allowed_file_extensions: tuple[str, ...] = ()
    allowed_file_upload_methods: tuple[str, ...] = ()

    @property
    def is_file(self) -> bool:
        return self.type in ("file", "file-list")


@dataclass(frozen=True)
class AppParameters:
    """The parsed answer of `GET /parameters`."""

    inputs: tuple[InputDef, ...]
    # Upload size limits in MB by class: "file" (documents etc.), "image", "audio", "video".
    file_size_limits_mb: dict[str, int] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def get(self, variable: str) -> InputDef | None:
        for item in self.inputs:
            if item.variable == variable:
                return item
        return None


@dataclass(frozen=True)
class RunResult:
    """What one request (workflow run, chat message, completion) produced.

    For chat / completion apps `outputs` holds `answer`; the ids are the `conversation_id` / `message_id` fields.
    `recovered` is True when the stream broke and the result came from looking the run up.
    """

    status: str
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    workflow_run_id: str | None = None
    task_id: str | None = None
    elapsed_s: float | None = None
    total_tokens: int | None = None
    total_price: float | None = None
    currency: str | None = None
    conversation_id: str | None = None
    message_id: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    retriever_resources: list[Any] | None = None
    recovered: bool = False

    @property
    def ok(self) -> bool:
        return self.status == TERMINAL_OK
