"""Errors the command line turns into one clear line and an exit code.

Every error a user can cause or meet is a ``ReconcilerError``; anything else is a bug
and keeps its traceback (shown with ``--debug``).
"""

from __future__ import annotations


class ReconcilerError(Exception):
    """An error with a message fit for the terminal and the exit code of the contract."""

    exit_code = 1


class ConfigError(ReconcilerError):
    """``reconciler.yaml`` or a command-line option is wrong."""


class ServerError(ReconcilerError):
    """A PostgreSQL server could not be started or reached."""


class SchemaLoadError(ReconcilerError):
    """A desired-schema file failed to load into the shadow database."""

    def __init__(
        self,
        path: str,
        line: int,
        column: int,
        message: str,
        *,
        hint: str | None = None,
        detail: str | None = None,
        statement: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.column = column
        self.pg_message = message
        self.hint = hint
        self.detail = detail
        self.statement = statement
        text = f"{path}:{line}:{column}: {message}"
        if detail:
            text += f"\n  DETAIL: {detail}"
        if hint:
            text += f"\n  HINT: {hint}"
        super().__init__(text)


class PlanFileError(ReconcilerError):
    """A plan file is unreadable or does not match its JSON Schema."""


class RefusedError(ReconcilerError):
    """The tool refuses to go on (stale plan, wrong target, lock held): exit code 3. ``check``: the plan check that
    refused (replay, freshness...), when one did."""

    exit_code = 3

    def __init__(self, message: str, *, check: str | None = None) -> None:
        self.check = check
        super().__init__(message)


class ApplyError(ReconcilerError):
    """A plan's steps failed on the target; the run is recorded as failed."""

    def __init__(self, message: str, run_id: str | None = None) -> None:
        self.run_id = run_id
        super().__init__(message)


class LockTimeoutError(ReconcilerError):
    """Another apply holds the target's lock for longer than we wait."""
