"""What an object the plan re-creates had, and the desired schema does not manage, is given back.

With ``manage_privileges`` off the plan does not touch privileges, and with ``manage_owners`` off it does not touch
owners; but a view migra drops and creates again (a column under it changes type), a function whose signature
changes, an enum rebuilt to lose a value, all come back with the applying role as owner and the default ACL: what was
granted on them, on their columns too, would be lost without a word. Each such object gets back live's owner and
live's ACL, after it is created again. (When privileges or owners are managed, ``privileges`` sets them as desired.)
"""

from __future__ import annotations

from ... import inspect
from ..base import Change
from ..classify import recreated
from . import Context
from .privileges import Planner, default_grants


def kept(context: Context, changes: list[Change]) -> list[Change]:
    options = context.options
    if options.manage_privileges and options.manage_owners:
        return changes
    again_made = recreated((c.kind, c.object) for c in changes)
    if not again_made:
        return changes
    live = inspect.security(context.live, exclude_schemas=context.exclude_schemas)
    again = {key: obj for key, obj in live.objects.items()
             if any(obj.bare == name or obj.bare.startswith(name + ".") for name in again_made)}
    if not again:
        return changes
    desired = inspect.security(context.desired, exclude_schemas=context.exclude_schemas)
    # what live had, for the objects the desired schema still holds (one it drops for good keeps nothing)
    wanted = inspect.Security({key: obj for key, obj in again.items() if key in desired.objects},
                              live.default_acls, live.applying_roles)
    planner = Planner(live, wanted, default_grants(context.live), again_made, manage_owners=not options.manage_owners)
    added: list[Change] = []
    if not options.manage_owners:
        added += planner.owners()
    if not options.manage_privileges:
        added += planner.privileges()
    return [*changes, *added]
