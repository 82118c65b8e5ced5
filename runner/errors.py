"""The one exception tree of dify-batch: every failure a user can see is one of these.

RunnerError
├── UsageError            bad flag value, invalid job file (CLI exit 2)
├── ConfigError           mapping does not fit the app, bad spec values (exit 1)
├── InputFileError        missing / unreadable / malformed input table, bad file column value
├── OutputError           output cannot be written (folder missing, locked, disk full)
├── StateError            checkpoint belongs to another job, is locked by another run, or is corrupt
└── DifyError             anything the Dify server (or the way to it) answered
    ├── TransportError        no HTTP answer: connection refused, DNS, TLS, read timeout
    ├── NotDifyError          the base URL answers, but not like a Dify Service API (HTML page, wrong JSON)
    ├── AuthError             401 unauthorized: bad or missing API key
    ├── ForbiddenError        403: app disabled / deleted, version pinning not allowed
    ├── NotFoundError         404: unknown run, conversation, workflow version, or wrong path
    ├── BadRequestError       400 permanent: invalid_param, app_unavailable, not_*_app, provider setup ...
    ├── ProviderError         400 completion_request_error: the model provider hiccuped (transient)
    ├── RateLimitedError      429 too_many_requests / 400 "Too many requests" / provider rate_limit_error
    ├── QuotaExceededError    429 plan caps (sandbox daily / monthly quota): not worth retrying today
    ├── UploadError           413 / 415 on /files/upload
    ├── ServerError           5xx with a Dify JSON body, or HTML from a gateway (502/503/504/524)
    ├── RunFailedError        HTTP 200 but the run ended failed / stopped (or an in-band `error` event)
    └── StreamInterruptedError  stream ended or went silent before its terminal event

Messages never contain the API key: the client builds them from status, code, server message and URL only.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "RunnerError", "UsageError", "ConfigError", "InputFileError", "OutputError", "StateError", "DifyError",
    "TransportError", "NotDifyError", "AuthError", "ForbiddenError", "NotFoundError", "BadRequestError", "ProviderError",
    "RateLimitedError", "QuotaExceededError", "UploadError", "ServerError", "RunFailedError", "StreamInterruptedError",
]  # fmt: skip


class RunnerError(Exception):
    """Root of every error dify-batch raises on purpose."""


class UsageError(RunnerError):
    """The command line or job file is wrong (exit code 2)."""


class ConfigError(RunnerError):
    """The job's settings do not fit together or do not fit the app."""


class InputFileError(RunnerError):
    """The input table (or a file a row points at) cannot be used."""


class OutputError(RunnerError):
    """The output table or the errors report cannot be written."""


class StateError(RunnerError):
    """The checkpoint database cannot be used for this job."""


class DifyError(RunnerError):
    """A failure reported by, or on the way to, the Dify server.

    `status` is the HTTP status (None when there was no HTTP answer), `code` Dify's error code
    (`invalid_param`, `too_many_requests`, ...), `message` the server's own words.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        url: str | None = None,
        run_id: str | None = None,
        task_id: str | None = None,
        result: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.url = url
        self.run_id = run_id
        self.task_id = task_id
        self.result = result

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class TransportError(DifyError):
    """No HTTP answer: refused, DNS failure, TLS failure, timeout."""


class NotDifyError(DifyError):
    """Something answered, but it is not a Dify Service API."""


class AuthError(DifyError):
    """401: the API key is missing or invalid."""


class ForbiddenError(DifyError):
    """403: the app or its API is disabled, or the plan forbids the call."""


class NotFoundError(DifyError):
    """404: the run, conversation, version or path does not exist."""


class BadRequestError(DifyError):
    """400 that will fail again if repeated (validation, app configuration, provider setup)."""


class ProviderError(DifyError):
    """400 completion_request_error: the model provider failed this time."""


class RateLimitedError(DifyError):
    """The server or provider asked us to slow down (429, or Dify's 400 "Too many requests")."""


class QuotaExceededError(DifyError):
    """A plan quota is used up; retrying today will not help."""


class UploadError(DifyError):
    """413 / 415 from /files/upload."""


class ServerError(DifyError):
    """5xx from Dify or an HTML error page from a gateway in front of it."""


class RunFailedError(DifyError):
    """The server accepted the request, but the run ended failed or stopped."""


class StreamInterruptedError(DifyError):
    """The stream ended or stalled before its terminal event and the run could not be recovered."""
