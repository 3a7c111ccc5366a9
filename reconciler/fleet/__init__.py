"""Fleets: one desired schema, many databases (one per tenant, say), across several servers.

Planning reads every database, groups them by live schema fingerprint and plans once per group: the plan names
every database of its group (``PlanBody.fleet``), so one review and one set of signatures covers them all
(``planning``). Applying runs each database under its own lock and history (``applying``). Work is bounded per
server, within a share of its connections (``placement``); ``members`` reads the databases and splits them into
shards; ``report`` is what the operator sees.
"""
