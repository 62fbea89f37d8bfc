"""kennel on AWS: the operator commands (push, role, train, tune, deploy, add-model,
list-models, autoscale, dashboard, lambda, invoke-async, teardown) behind `kennel-aws`
(or `python -m kennel_ops.aws`).

Every command is idempotent (a second run changes nothing, or updates in place)
and takes --dry-run, which prints the mutating API requests it would send as
JSON and sends none of them (read-only Describe/List/Get requests still run, so
the plan reflects what exists).
"""
