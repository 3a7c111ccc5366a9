"""Run a command and measure it: wall time and the peak resident memory the kernel reports for it.

``os.wait4`` returns the child's own resource usage, so the figure belongs to that one command and not to
everything this process ever started (``RUSAGE_CHILDREN`` accumulates). Its ``ru_maxrss`` is the largest
resident set of the command or of any process it started and waited for (pg_dump, squawk): a peak, not a sum.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class BenchError(Exception):
    """A command failed where it should not have: the benchmark stops and says why."""


@dataclass(frozen=True)
class Measured:
    argv: tuple[str, ...]
    seconds: float
    peak_mib: float
    exit_code: int
    stdout: Path
    stderr: Path

    def stderr_tail(self, lines: int = 25) -> str:
        return tail(self.stderr, lines)


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def shown(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _maxrss_mib(usage: Any) -> float:
    return float(usage.ru_maxrss) / 1024.0  # Linux reports KiB


def run(argv: Sequence[str], *, label: str, logs: Path, expect: Sequence[int], timeout: float,
        cwd: Path | None = None, env: Mapping[str, str] | None = None) -> Measured:
    """Run ``argv`` to completion; its stdout and stderr go to ``logs``/<label>.out and .err. An exit code not in
    ``expect`` (or the timeout) raises BenchError with the end of its stderr."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{label}.out", logs / f"{label}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=dict(env) if env is not None else None)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            _kill(proc.pid)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            _kill(proc.pid)
            os.wait4(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # reaped here: keep Popen from waiting for it again
    measured = Measured(tuple(argv), seconds, _maxrss_mib(usage), code, out_path, err_path)
    if timed_out.is_set():
        raise BenchError(f"{label}: `{shown(argv)}` took over {timeout:g} s and was killed\n"
                         f"--- stderr (last lines) ---\n{measured.stderr_tail()}")
    if code not in expect:
        raise BenchError(f"{label}: `{shown(argv)}` exited {code} (expected {' or '.join(map(str, expect))})\n"
                         f"--- stderr (last lines, all of it in {err_path}) ---\n{measured.stderr_tail()}")
    return measured


def _kill(pid: int, signum: int = signal.SIGKILL) -> None:
    """Signal a child we have not reaped yet (Popen's own kill() polls, and polling would reap it and lose its
    resource usage)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


@dataclass(frozen=True)
class LogLine:
    at: float  # time.perf_counter() when the line was read
    level: str
    message: str


class LoggedProcess:
    """A long-running command logging JSON lines (``--log-format json``) on stderr, read as they come, each
    stamped with the time it arrived. stdout and every stderr line are also kept in files under ``logs``."""

    def __init__(self, argv: Sequence[str], *, label: str, logs: Path, cwd: Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.argv = tuple(argv)
        self.label = label
        self.err_path = logs / f"{label}.err"
        self._out = (logs / f"{label}.out").open("wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(list(argv), stdout=self._out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     cwd=cwd, env=dict(env) if env is not None else None)
        self.lines: queue.Queue[LogLine | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"{label}-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.err_path.open("wb") as keep:
            for raw in self.proc.stderr:
                at = time.perf_counter()
                keep.write(raw)
                keep.flush()
                text = raw.decode(errors="replace").rstrip("\n")
                try:
                    entry = json.loads(text)
                    line = LogLine(at, str(entry.get("level", "")), str(entry.get("message", "")))
                except (ValueError, AttributeError):
                    line = LogLine(at, "", text)
                self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, prefix: str, *, timeout: float, what: str) -> LogLine:
        """The next line whose message starts with ``prefix``; BenchError when the process ends first or the
        timeout passes."""
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError(f"{self.label}: no {what} within {timeout:g} s\n"
                                 f"--- stderr (last lines) ---\n{tail(self.err_path)}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait()
                raise BenchError(f"{self.label}: `{shown(self.argv)}` ended (exit {self.proc.returncode}) before "
                                 f"{what}\n--- stderr (last lines) ---\n{tail(self.err_path)}")
            if line.message.startswith(prefix):
                return line

    def stop(self, *, timeout: float = 60) -> tuple[int, float]:
        """SIGTERM, then its exit code and peak resident MiB."""
        _kill(self.proc.pid, signal.SIGTERM)
        timer = threading.Timer(timeout, _kill, (self.proc.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(self.proc.pid, 0)
        finally:
            timer.cancel()
        code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = code
        self._finish()
        return code, _maxrss_mib(usage)

    def _finish(self) -> None:
        self._reader.join(10)
        self._out.close()
