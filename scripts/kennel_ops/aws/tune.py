"""Run a SageMaker hyperparameter tuning job over the kennel-train image.

By default it searches the original ranges: learning_rate 0.001-0.1
(continuous, logarithmic) and batch_size 32-512 (integer, logarithmic), and
minimises the validation loss (the metric chosen from the image's
MetricDefinitions: valid:loss, validation:loss or val:loss, unless
--objective-metric). The original minimised "Testing Loss" (the test split,
with a loss that grew with the batch size); here the test split stays unseen.

Trials run on managed spot with --spot but without a checkpoint path: trials
share one job definition, so a shared path would let one trial resume from
another's weights; an interrupted trial restarts instead.

It waits (unless --no-wait), then prints the best training job and its
hyperparameters; deploy it with `kennel-aws deploy --training-job BEST`.
"""
from __future__ import annotations

import argparse

from kennel_ops.aws.context import Aws, CliError, describe_or_none
from kennel_ops.aws.names import TUNING_NAME_MAX, Names
from kennel_ops.aws.training import (add_job_arguments, check_data, check_pretrained, hyperparameters,
                                 job_definition, load_metric_definitions, resolve_image, resolve_inputs, resolve_role)
from kennel_ops.aws.waiting import Poll, wait_for

COMMAND = "tune"
HELP = "run a hyperparameter tuning job (learning rate, batch size) minimising validation loss"
OBJECTIVE_CANDIDATES = ("valid:loss", "validation:loss", "val:loss")


def float_range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        pair = (float(low), float(high))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}") from None
    if not sep or not 0 < pair[0] < pair[1]:
        raise argparse.ArgumentTypeError(f"expected 0 < MIN < MAX, got {text!r}")
    return pair


def int_range(text: str) -> tuple[int, int]:
    low, high = float_range(text)
    if low != int(low) or high != int(high):
        raise argparse.ArgumentTypeError(f"expected whole numbers MIN:MAX, got {text!r}")
    return int(low), int(high)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job-name", help=f"tuning job name, at most {TUNING_NAME_MAX} characters "
                        "(default: NAME-<UTC timestamp>); an existing job is waited for, not created again")
    search = parser.add_argument_group("search")
    search.add_argument("--learning-rate", type=float_range, default=(0.001, 0.1), metavar="MIN:MAX",
                        help="continuous, logarithmic (default: 0.001:0.1)")
    search.add_argument("--batch-size", type=int_range, default=(32, 512), metavar="MIN:MAX",
                        help="integer, logarithmic (default: 32:512)")
    search.add_argument("--objective-metric", help="metric to minimise (default: the validation loss in the "
                        "metric definitions)")
    search.add_argument("--max-jobs", type=int, default=4, help="training jobs in all (%(default)s)")
    search.add_argument("--parallel-jobs", type=int, default=2, help="training jobs at a time (%(default)s)")
    search.add_argument("--strategy", choices=("Bayesian", "Random", "Hyperband"), default="Bayesian",
                        help="(%(default)s)")
    search.add_argument("--early-stopping", choices=("Auto", "Off"), default="Auto",
                        help="stop trials that are unlikely to beat the best so far (%(default)s)")
    add_job_arguments(parser)
    parser.add_argument("--wait-hours", type=float, default=72.0, help="give up waiting after this long (%(default)s)")


def objective_metric(metrics: list[dict[str, str]], chosen: str | None) -> str:
    names = [m["Name"] for m in metrics]
    if chosen:
        if chosen not in names:
            raise CliError(f"--objective-metric {chosen!r} is not among the metric definitions: {', '.join(names)}")
        return chosen
    for candidate in OBJECTIVE_CANDIDATES:
        if candidate in names:
            return candidate
    raise CliError(f"no validation-loss metric among {', '.join(names)}: pass --objective-metric")


def parameter_ranges(args: argparse.Namespace) -> dict:
    return {
        "ContinuousParameterRanges": [{"Name": "learning_rate", "MinValue": f"{args.learning_rate[0]:g}",
                                       "MaxValue": f"{args.learning_rate[1]:g}", "ScalingType": "Logarithmic"}],
        "IntegerParameterRanges": [{"Name": "batch_size", "MinValue": str(args.batch_size[0]),
                                    "MaxValue": str(args.batch_size[1]), "ScalingType": "Logarithmic"}],
    }


def tuning_request(aws: Aws, args: argparse.Namespace, names: Names, job_name: str) -> dict:
    if not 1 <= args.parallel_jobs <= args.max_jobs:
        raise CliError(f"need 1 <= --parallel-jobs ({args.parallel_jobs}) <= --max-jobs ({args.max_jobs})")
    static = hyperparameters(args.hyperparameter)
    for tuned in ("learning_rate", "batch_size"):
        if tuned in static:
            raise CliError(f"{tuned} is tuned: give its range (--{tuned.replace('_', '-')} MIN:MAX), not -p {tuned}=")
    inputs = resolve_inputs(args, names)
    check_pretrained(inputs, static)
    metrics = load_metric_definitions(args.metric_definitions)
    objective = objective_metric(metrics, args.objective_metric)
    role = resolve_role(aws, args, names)
    image = resolve_image(aws, args, names.train_repository)
    check_data(aws, inputs)
    definition = job_definition(args, image=image, role=role, inputs=inputs, metrics=metrics)
    definition["StaticHyperParameters"] = static
    config = {
        "Strategy": args.strategy,
        "HyperParameterTuningJobObjective": {"Type": "Minimize", "MetricName": objective},
        "ResourceLimits": {"MaxNumberOfTrainingJobs": args.max_jobs, "MaxParallelTrainingJobs": args.parallel_jobs},
        "ParameterRanges": parameter_ranges(args),
    }
    if args.strategy != "Hyperband":  # Hyperband has its own early stopping
        config["TrainingJobEarlyStoppingType"] = args.early_stopping
    return {"HyperParameterTuningJobName": job_name, "HyperParameterTuningJobConfig": config,
            "TrainingJobDefinition": definition, "Tags": aws.tag_list()}


def counters(description: dict) -> str:
    counts = description.get("TrainingJobStatusCounters") or {}
    text = ", ".join(f"{key} {value}" for key, value in counts.items() if value)
    best = (description.get("BestTrainingJob") or {}).get("FinalHyperParameterTuningJobObjectiveMetric")
    return text + (f"; best {best['MetricName']} {best['Value']:g}" if best else "")


def run(args: argparse.Namespace) -> None:
    aws = Aws.from_args(args)
    names = Names(args.name)
    job_name = args.job_name or names.tuning_job()
    if len(job_name) > TUNING_NAME_MAX:
        raise CliError(f"--job-name {job_name!r} is longer than {TUNING_NAME_MAX} characters")
    sagemaker = aws.client("sagemaker")
    existing = describe_or_none(sagemaker.describe_hyper_parameter_tuning_job, HyperParameterTuningJobName=job_name)
    if existing:
        aws.console.note(f"tuning job {job_name} exists ({existing['HyperParameterTuningJobStatus']}); "
                         "not creating it again")
    else:
        aws.send("sagemaker", "create_hyper_parameter_tuning_job", **tuning_request(aws, args, names, job_name))
        if not aws.dry_run:
            aws.console.note(f"tuning job {job_name}: created")
    if aws.dry_run or args.no_wait:
        aws.console.result(job_name)
        return
    description = wait_for(
        f"tuning job {job_name}",
        lambda: sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=job_name),
        status=lambda d: d["HyperParameterTuningJobStatus"], done={"Completed"}, failed={"Failed", "Stopped"},
        detail=counters, reason=lambda d: d.get("FailureReason", ""), console=aws.console,
        poll=Poll(interval_s=args.poll_seconds, timeout_s=args.wait_hours * 3600))
    report(aws, description)


def report(aws: Aws, description: dict) -> None:
    best = description.get("BestTrainingJob")
    if not best:
        raise CliError(f"tuning job {description['HyperParameterTuningJobName']} finished without a best training job "
                       "(no trial reported the objective metric)")
    objective = best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
    aws.console.result(f"best {best['TrainingJobName']}")
    if objective:
        aws.console.result(f"objective {objective['MetricName']} {objective['Value']:g}")
    for key, value in sorted((best.get("TunedHyperParameters") or {}).items()):
        aws.console.result(f"hyperparameter {key} {value}")
    aws.console.note(f"deploy it: kennel-aws deploy --training-job {best['TrainingJobName']}")
