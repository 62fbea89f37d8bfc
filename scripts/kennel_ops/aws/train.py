"""Run a SageMaker training job with the kennel-train image.

The job gets the MetricDefinitions the training image exports, the channels of
the original layout (--data) or split ones, string hyperparameters, a checkpoint
S3 URI (/opt/ml/checkpoints is synced there, so a managed-spot interruption
resumes instead of restarting) and TensorBoard output. Unless --no-wait, it
waits and prints each status change, then the final metrics and the model URI.

Idempotent by name: with --job-name, an existing job of that name is not
created again; the command waits for it (or reports it) instead.
"""
from __future__ import annotations

import argparse
import re

from kennel_ops.aws.context import Aws, CliError, describe_or_none
from kennel_ops.aws.names import Names
from kennel_ops.aws.training import (CHECKPOINT_LOCAL_PATH, TENSORBOARD_LOCAL_PATH, add_job_arguments, check_data,
                                 check_pretrained, final_metrics, hyperparameters, job_definition,
                                 load_metric_definitions, resolve_image, resolve_inputs, resolve_role)
from kennel_ops.aws.waiting import Poll, wait_for

COMMAND = "train"
HELP = "run a SageMaker training job (managed spot, checkpoints, TensorBoard) and show its metrics"
JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job-name", help="training job name (default: NAME-<UTC timestamp>); "
                        "an existing job of this name is waited for, not created again")
    add_job_arguments(parser)
    parser.add_argument("--no-tensorboard", action="store_true", help="do not upload TensorBoard logs")
    parser.add_argument("--wait-hours", type=float, default=48.0, help="give up waiting after this long (%(default)s)")


def training_request(aws: Aws, args: argparse.Namespace, names: Names, job_name: str) -> dict:
    inputs = resolve_inputs(args, names)
    metrics = load_metric_definitions(args.metric_definitions)
    hps = hyperparameters(args.hyperparameter)
    check_pretrained(inputs, hps)
    role = resolve_role(aws, args, names)
    image = resolve_image(aws, args, names.train_repository)
    check_data(aws, inputs)
    request = {"TrainingJobName": job_name,
               **job_definition(args, image=image, role=role, inputs=inputs, metrics=metrics),
               "HyperParameters": hps,
               "CheckpointConfig": {"S3Uri": str(inputs.output.child("checkpoints", job_name)),
                                    "LocalPath": CHECKPOINT_LOCAL_PATH},
               "Tags": aws.tag_list()}
    if not args.no_tensorboard:
        request["TensorBoardOutputConfig"] = {"S3OutputPath": str(inputs.output.child("tensorboard", job_name)),
                                              "LocalPath": TENSORBOARD_LOCAL_PATH}
    return request


def progress_detail(description: dict) -> str:
    transitions = description.get("SecondaryStatusTransitions") or []
    message = transitions[-1].get("StatusMessage", "") if transitions else ""
    return f"{description.get('SecondaryStatus', '')}: {message}".strip(": ")


def run(args: argparse.Namespace) -> None:
    aws = Aws.from_args(args)
    names = Names(args.name)
    job_name = args.job_name or names.training_job()
    if not JOB_NAME.match(job_name):
        raise CliError(f"invalid --job-name {job_name!r}: 1-63 letters, digits and hyphens")
    sagemaker = aws.client("sagemaker")
    existing = describe_or_none(sagemaker.describe_training_job, TrainingJobName=job_name)
    if existing:
        aws.console.note(f"training job {job_name} exists ({existing['TrainingJobStatus']}); not creating it again")
    else:
        aws.send("sagemaker", "create_training_job", **training_request(aws, args, names, job_name))
        if not aws.dry_run:
            aws.console.note(f"training job {job_name}: created")
    if aws.dry_run or args.no_wait:
        aws.console.result(job_name)
        return
    description = wait_for(
        f"training job {job_name}", lambda: sagemaker.describe_training_job(TrainingJobName=job_name),
        status=lambda d: d["TrainingJobStatus"], done={"Completed"}, failed={"Failed", "Stopped"},
        detail=progress_detail, reason=lambda d: d.get("FailureReason", ""), console=aws.console,
        poll=Poll(interval_s=args.poll_seconds, timeout_s=args.wait_hours * 3600))
    report(aws, description)


def report(aws: Aws, description: dict) -> None:
    aws.console.result(f"job {description['TrainingJobName']} {description['TrainingJobStatus']}")
    aws.console.result(f"model {description.get('ModelArtifacts', {}).get('S3ModelArtifacts', '-')}")
    for name, value in sorted(final_metrics(description).items()):
        aws.console.result(f"metric {name} {value:g}")
    billable, total = description.get("BillableTimeInSeconds"), description.get("TrainingTimeInSeconds")
    if billable is not None and total:
        aws.console.note(f"billed {billable} s of {total} s" +
                         (f" (managed spot saved {100 * (1 - billable / total):.0f}%)"
                          if description.get("EnableManagedSpotTraining") else ""))
