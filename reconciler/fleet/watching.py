"""``reconciler watch`` for a fleet: on every change and every interval, each database is read, each distinct live
state planned, and each plan applied to its databases where the environment and the policy allow it (written to
the plans folder for review otherwise). ``/metrics`` has the fleet's series, labelled with its name: databases by
state, distinct states, the last apply's outcomes, and each database apply counted by outcome."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ..apply import ApplyOptions
from ..config import Config, Environment
from ..pipeline import auto_apply_blockers
from ..watch import Watcher, WatchOptions, describe_error
from .applying import apply_fleet
from .members import survey
from .placement import shares
from .planning import plan_fleet
from .report import actions, totals

log = logging.getLogger(__name__)


class FleetWatcher(Watcher):
    """The loop, the signals and the HTTP endpoint are the single database's (watch.Watcher); a cycle is the fleet's."""

    def __init__(self, config: Config, env: Environment, options: WatchOptions, apply_options: ApplyOptions) -> None:
        super().__init__(config, env, options, apply_options)
        self.series = FleetSeries(env.name, self.metrics.registry)

    @contextlib.contextmanager
    def _target(self) -> Iterator[Any]:
        yield None  # no server kept up: each cycle connects to the fleet's databases within their shares

    def _cycle(self, servers: Any, trigger: str, changed: str = "") -> None:
        if self._stop.is_set():
            return
        if changed:
            log.info("changed: %s", changed)
        try:
            ok = self._fleet_cycle(trigger)
        except KeyboardInterrupt:
            self._stop.set()
            self._report(trigger, "cancelled", "stopping: the step under way was cancelled", logging.WARNING)
            ok = False
        except Exception as exc:  # the fleet list unreadable, the shadow away: reported, and the loop goes on
            (self.metrics.drift_checks if trigger == "drift" else self.metrics.plans).labels("error").inc()
            self._report(trigger, "error", describe_error(exc), logging.ERROR)
            ok = False
        self.metrics.last_run.set(time.time())
        self.metrics.last_success.set(1 if ok else 0)
        self.cycles += 1

    def _fleet_cycle(self, trigger: str) -> bool:
        fleet = self.series
        dsns = self.env.fleet_dsns()
        found = shares(dsns, self.env.concurrency)
        with self._work("survey"):
            members = survey(self.config, dsns, found)
        with self._work("plan"):
            groups = plan_fleet(self.config, self.env, members, schemas_dir=self.options.schemas_dir)
        unreachable = [m for m in members if m.error is not None]
        differing = [g for g in groups if g.plan.body.steps]
        matching = sum(len(g.members) for g in groups if not g.plan.body.steps)
        fleet.observe_states(matches=matching, differs=sum(len(g.members) for g in differing),
                             unreachable=len(unreachable), states=len(groups))
        self.metrics.drift.set(1 if differing else 0)
        if trigger == "drift":  # a look every interval: a drift check (its plans are counted when one is due)
            self.metrics.drift_checks.labels("found" if differing else "none").inc()
        outcomes = []
        written = 0
        for group in groups:
            plan = group.plan
            if not plan.body.steps:
                if trigger != "drift":
                    self.metrics.plans.labels("no_changes").inc()
                continue
            blockers = auto_apply_blockers(self.env, plan)
            if blockers:
                written += 1 if self._write(plan, trigger, blockers) else 0
                continue
            self.metrics.plans.labels("auto_apply").inc()
            with self._work("apply"):
                outcomes += apply_fleet([plan], group.members, self.apply_options, found)
        fleet.observe_outcomes(outcomes)
        for outcome in outcomes:  # the loop's own count of applies, as one database's watcher keeps it
            if outcome.status in ("applied", "failed", "refused"):
                self.metrics.applies.labels(outcome.status).inc()
        counted = totals(outcomes)
        summary = (f"{len(members)} database(s) in {len(groups)} state(s): {matching} match the desired schema, "
                   f"{sum(len(g.members) for g in differing)} differ, {len(unreachable)} unreachable")
        if outcomes:
            summary += "; applied: " + ", ".join(f"{n} {s}" for s, n in counted.items())
        if written:
            summary += f"; {written} plan(s) written for review"
        problems = actions(outcomes)
        failed = bool(unreachable) or any(not o.ok for o in outcomes)
        self._report(trigger, "error" if failed else "applied" if outcomes else "no_changes",
                     summary + "".join(f"; {line}" for line in problems)
                     + "".join(f"; {m.label}: {m.error}" for m in unreachable[:3]),
                     logging.WARNING if failed else logging.INFO)
        return not failed


class FleetSeries:
    """The fleet's own series, in the watcher's registry, each labelled with the fleet's name."""

    STATES = ("matches", "differs", "unreachable")
    OUTCOMES = ("applied", "done", "nothing", "refused", "failed", "skipped")

    def __init__(self, fleet: str, registry: Any) -> None:
        from prometheus_client import Counter as PromCounter
        from prometheus_client import Gauge

        self.fleet = fleet
        self.databases = Gauge("reconciler_fleet_databases", "Databases of the fleet at the last look: matches (the "
                               "desired schema), differs (a plan applies or waits for review), unreachable",
                               ["fleet", "state"], registry=registry)
        self.states = Gauge("reconciler_fleet_states", "Distinct live schema states at the last look", ["fleet"],
                            registry=registry)
        self.last_apply = Gauge("reconciler_fleet_last_apply_databases", "Databases by outcome of the last cycle "
                                "that applied a plan", ["fleet", "status"], registry=registry)
        self.applies = PromCounter("reconciler_fleet_database_applies", "Database applies, by outcome",
                                   ["fleet", "status"], registry=registry)
        for state in self.STATES:
            self.databases.labels(fleet, state)
        for status in self.OUTCOMES:  # every series from the start, at 0, so rate() and alerts see them
            self.last_apply.labels(fleet, status)
            self.applies.labels(fleet, status)
        self.states.labels(fleet)

    def observe_states(self, *, matches: int, differs: int, unreachable: int, states: int) -> None:
        for state, count in (("matches", matches), ("differs", differs), ("unreachable", unreachable)):
            self.databases.labels(self.fleet, state).set(count)
        self.states.labels(self.fleet).set(states)

    def observe_outcomes(self, outcomes: list[Any]) -> None:
        """The last cycle that applied anything sets the gauges: a cycle with nothing to apply leaves them."""
        if not outcomes:
            return
        counted = Counter(o.status for o in outcomes)
        for status in self.OUTCOMES:
            self.last_apply.labels(self.fleet, status).set(counted.get(status, 0))
            if counted.get(status):
                self.applies.labels(self.fleet, status).inc(counted[status])
