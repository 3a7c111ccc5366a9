"""The safety compiler: diff statements in, plan steps out.

Every statement is parsed with pglast (never grepped) and knowing the live tables it:
- names its hazards, with the live size of the table they concern (``hazards``);
- rewrites it into an online-safe form where one exists, each switchable off, one module per strategy:
  CONCURRENTLY (``indexes``), NOT VALID + VALIDATE (``constraints``), SET NOT NULL through a validated CHECK
  (``not_null``), ALTER TYPE ... ADD VALUE (``enum_values``), renames first (``renaming``);
- derives the SQL that undoes it (a created object's DROP), or marks it irreversible: each strategy returns its
  forward steps with their way back (``rollback`` for the plain forms);
- groups steps into phases: one transaction each, or a single statement that cannot run in one (``phases``).
Statements that touch only objects created by the same plan keep their plain form, in the main
transaction: nobody uses those objects yet, a new table is empty (validating a constraint on it
is instant, so NOT VALID + VALIDATE becomes one validated ADD), and CONCURRENTLY cannot run in the
transaction that creates the table. What such a step does to an existing table (a foreign key's
lock on the table it references) keeps its hazard.

``steps`` holds what the rest of the tool uses: Step, Hazard, HazardCode, LintFinding, SafetySettings.
"""

from .phases import compile_steps
from .steps import Estimate, Hazard, HazardCode, LintFinding, SafetySettings, SourceLine, Step

__all__ = ["Estimate", "Hazard", "HazardCode", "LintFinding", "SafetySettings", "SourceLine", "Step", "compile_steps"]
