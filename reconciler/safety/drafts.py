"""Steps before numbering, phases and timeouts, and the stage each runs in.

Stages, in execution order; within a stage steps keep the diff engine's (dependency) order.
RENAME: renames from annotations (renames.py), before all, so every later step sees the new names. PRE: new enum
values (nothing needs them absent). PRE_INDEX: concurrent builds over columns that already exist, so the main
transaction can use them (ADD CONSTRAINT ... USING INDEX). MAIN: one transaction with everything else. EXPAND: a
dual column's new column and trigger, a transaction per table (one that locked two tables one after the other could
deadlock with a write that takes them in the other order, and the server might end the write). POST_INDEX:
concurrent builds that need the main transaction's columns, then POST_DEPENDENT: the constraints that use those
indexes. BACKFILL: a new column's old rows filled, in batches (each its own transaction), while a trigger fills new
writes. POST_VALIDATE: each VALIDATE CONSTRAINT in its own transaction (writes go on). POST_NOT_NULL: SET NOT NULL
spared its scan by the validated CHECK. CUTOVER: dual columns put in the place of the old ones (one short
transaction). POST_CUTOVER: the foreign keys a cut-over re-pointed validated, each in a transaction of its own, and
the old columns dropped. POST_DROP: indexes dropped concurrently, last.
"""

from __future__ import annotations

from dataclasses import dataclass

from .steps import Hazard

RENAME = -1
(PRE, PRE_INDEX, MAIN, EXPAND, POST_INDEX, POST_DEPENDENT, BACKFILL, POST_VALIDATE, POST_NOT_NULL, CUTOVER,
 POST_CUTOVER, POST_DROP) = range(12)


@dataclass(frozen=True)
class Draft:
    """A step as a strategy makes it: its forward SQL with the SQL that undoes it (``rollback_sql``; None: cannot
    be undone, "" : nothing to undo), and where it must run."""

    sql: str
    kind: str
    object: str
    tables: tuple[str, ...]
    transactional: bool = True
    isolated: bool = False  # a transaction of its own (VALIDATE: long, but does not block writes)
    stage: int = MAIN
    index_name: str | None = None  # for CREATE INDEX CONCURRENTLY: the index it builds
    uses_index: str | None = None  # for ADD CONSTRAINT ... USING INDEX: the index it needs
    hazards: tuple[Hazard, ...] = ()
    rollback_sql: str | None = None
    reversible: bool = False
    original_sql: str | None = None
    identity: tuple[str, ...] = ()  # the object's name parts, from the parse tree (see classify.identity_of)
    helper: bool = False  # an object a strategy makes for the plan's own use and drops before it ends
    group: str | None = None  # steps of one group share a transaction, with no step outside it
