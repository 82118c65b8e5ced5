"""dify-batch: run Dify apps over tables of data, concurrently and resumably.

Public API (imported lazily, so `dify-batch --help` stays fast):
    run_job, validate_job, JobSummary   -- runner.job
    JobSpec, build_spec                 -- runner.spec
    DifyClient                          -- runner.dify (async)
    Dify, StreamedChat, file_input      -- runner.sync (synchronous wrapper for scripts)
    ConversationCache                   -- runner.conversations
    RunnerError and the rest of the error tree -- runner.errors
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import *  # noqa: F403  (the error tree is tiny and import-free)
from .errors import __all__ as _error_names

__version__ = "0.1.0"

_LAZY = {
    "run_job": "job", "validate_job": "job", "JobSummary": "job",
    "JobSpec": "spec", "build_spec": "spec",
    "DifyClient": "dify",
    "Dify": "sync", "StreamedChat": "sync", "file_input": "sync",
    "ConversationCache": "conversations",
    "AppParameters": "models", "InputDef": "models", "RunResult": "models",
}  # fmt: skip

__all__ = ["__version__", *_LAZY, *_error_names]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
