"""What an operator sees of a fleet command: progress while it runs, then a table, totals and one line per problem
saying what to do, or all of it as JSON."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TextIO

from .applying import Outcome

log = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 5.0  # without a terminal (a Job's pod log): a progress line this often


class FleetProgress:
    """Databases done, failed and left, the rate and the time left: a live line on a terminal, else a log line every
    few seconds and one at the end."""

    def __init__(self, what: str, total: int, status: AbstractContextManager[Any] | None = None,
                 emit: Callable[[str], None] | None = None) -> None:
        """``status``: a live line (a terminal's); else each line goes to ``emit`` (default: an info log line)."""
        self.what, self.total = what, total
        self.emit = emit or (lambda line: log.info("%s", line))
        self.finished = self.failed = 0
        self.started = time.monotonic()
        self._logged = self.started
        self._guard = threading.Lock()
        self._status_cm = status
        self._status: Any = None

    def __enter__(self) -> FleetProgress:
        if self._status_cm is not None:
            self._status = self._status_cm.__enter__()
            self._status.update(self.line())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status_cm is not None:
            self._status_cm.__exit__(None, None, None)
        elif self.total:
            self.emit(self.line())

    def tick(self, ok: bool) -> None:
        with self._guard:
            self.finished += 1
            self.failed += 0 if ok else 1
            text = self.line()
            now = time.monotonic()
            due = now - self._logged >= LOG_EVERY_SECONDS
            if due:
                self._logged = now
        if self._status is not None:
            self._status.update(text)
        elif due:
            self.emit(text)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        left = self.total - self.finished
        rate = self.finished / elapsed
        eta = f", about {_duration(left / rate)} left" if self.finished and left else ""
        return (f"{self.what}: {self.finished - self.failed} done, {self.failed} failed, {left} left of {self.total} "
                f"({rate:.1f}/s{eta})")


def _duration(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60}m{whole % 60:02d}s" if whole >= 60 else f"{whole}s"


def totals(outcomes: Sequence[Outcome]) -> dict[str, int]:
    return dict(sorted(Counter(o.status for o in outcomes).items()))


def actions(outcomes: Sequence[Outcome], *, missing: Sequence[str] = (), fleet_list: str = "the fleet list") -> list[str]:
    """One line per problem, saying what to do; the databases named (three, then how many more)."""
    lines = []
    by_cause: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if not o.ok and o.cause:
            by_cause.setdefault(o.cause, []).append(o)
    unreached: dict[str, list[Outcome]] = {}
    for o in by_cause.pop("server", []):
        unreached.setdefault(o.server, []).append(o)
    lost: dict[str, list[Outcome]] = {}
    for o in by_cause.pop("lost", []):
        lost.setdefault(o.server, []).append(o)
    for server in dict.fromkeys([*unreached, *lost]):
        cut = lost.get(server, [])
        lost_text = (f"{len(cut)} database(s) lost their connection mid-run ({_names(cut)}): the next command marks "
                     "those runs interrupted, so plan again for them, then apply") if cut else ""
        if server not in unreached:
            lines.append(lost_text)
            continue
        lines.append(f"server {server} went away or could not be reached (down or restarting): {len(unreached[server])} database(s) "
                     "not applied; when it is back, run the same apply again: what applied is done, only these are "
                     "tried" + (f"; {lost_text}" if cut else ""))
    gone = by_cause.pop("gone", [])
    if gone:
        lines.append(f"{len(gone)} database(s) no longer exist ({_names(gone)}): remove them from {fleet_list} if "
                     "they left the fleet")
    if missing:
        lines.append(f"{len(missing)} database(s) named by the plans are no longer in {fleet_list} "
                     f"({_named(list(missing))}): not applied; if they left the fleet there is nothing to do")
    stale = by_cause.pop("freshness", [])
    if stale:
        lines.append(f"{len(stale)} database(s) changed since they were planned ({_names(stale)}): "
                     "plan again, review, and apply the new plans; the others are unaffected")
    interrupted = by_cause.pop("interrupted", []) + by_cause.pop("unplanned", [])
    if interrupted:
        lines.append(f"{len(interrupted)} database(s) need a new plan ({_names(interrupted)}): a run stopped half-way "
                     "there since, or no plan names them; plan again, then apply")
    for cause, hit in sorted(by_cause.items()):
        what = "refused" if all(o.status == "refused" for o in hit) else "failed"
        lines.append(f"{len(hit)} database(s) {what} ({cause}: {_names(hit)}): see each one's error above; "
                     "apply again to retry only them once fixed")
    return lines


def _names(outcomes: Sequence[Outcome]) -> str:
    return _named([o.label for o in outcomes])


def _named(labels: list[str]) -> str:
    return ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")


def write_table(outcomes: Sequence[Outcome], out: TextIO, *, seconds: float, notes: Sequence[str] = ()) -> None:
    """One line per database, the totals, then what to do."""
    if not outcomes:
        out.write("No database to work on (an empty shard, or an empty fleet list): nothing to do.\n")
        return
    rows = [("DATABASE", "STATUS", "PLAN", "STEPS", "TIME", "ERROR")]
    rows += [(o.label, o.status, o.plan_id or "-", str(o.steps), f"{o.duration_ms:.0f} ms",
              (o.error or (f"by run {o.run_id}" if o.status == "done" and o.run_id else ""))[:400]) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        out.write("  ".join(cell.ljust(widths[i]) if i < 5 else cell for i, cell in enumerate(row)).rstrip() + "\n")
    counted = totals(outcomes)
    out.write(f"{len(outcomes)} database(s) in {seconds:.1f} s: " + ", ".join(f"{n} {s}" for s, n in counted.items())
              + "\n")
    if outcomes and set(counted) <= {"done", "nothing"}:
        out.write("Nothing to apply: every database already has its plan applied.\n")
    if notes:
        out.write("What to do:\n" + "".join(f"  - {line}\n" for line in notes))


def as_json(outcomes: Sequence[Outcome], *, seconds: float, notes: Sequence[str] = ()) -> dict[str, Any]:
    """The fields named as history's and drift's JSON name them (database, plan, run)."""
    return {"databases": [{"database": o.label, "server": o.server, "status": o.status, "ok": o.ok, "plan": o.plan_id,
                           "run": o.run_id, "steps": o.steps, "duration_ms": round(o.duration_ms, 1), "error": o.error,
                           "cause": o.cause} for o in outcomes],
            "totals": totals(outcomes), "seconds": round(seconds, 3), "actions": list(notes)}
