"""Applying a plan: the executor, the checks it makes first, the verification after, and the settling of runs
that stopped short (see ARCHITECTURE.md)."""

from .checks import plan_checks
from .executor import apply_plan
from .options import ApplyOptions, ApplyResult, BackfillLimits
from .recovery import Settled, settle

__all__ = ["ApplyOptions", "ApplyResult", "BackfillLimits", "Settled", "apply_plan", "plan_checks", "settle"]
