"""kennel's operator tooling: one command per job, each a module with main().

    kennel-aws                push, role, train, tune, deploy, autoscale, dashboard, lambda, teardown (aws/)
    kennel-smoke              the serving container and the Lambda handler end to end on this host
    kennel-loadtest           max sustainable rate and the auto-scaling target of an endpoint (load/)
    kennel-local-runtime      the SageMaker runtime API on 127.0.0.1, forwarding to a container
    kennel-lambda-zip         the Lambda deployment package, the same bytes every build
    kennel-lambda-policy      the Lambda function's IAM policies for one account and endpoint
    kennel-lambda-cold-start  the Lambda function's import and first-call cost
    kennel-download-data      dogImages into data/, checked
    kennel-bench-*            the benchmarks of docs/benchmarks.md (bench/; they need torch)

`python -m kennel_ops.MODULE` runs the same (`python -m kennel_ops.aws` for kennel-aws).
checkout.REPO is the checkout they work on (the package is installed editable from it).
"""
