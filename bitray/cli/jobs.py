"""``bitray submit``, ``bitray jobs ...`` and ``bitray schedule``: run pipelines on a Ray cluster."""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import UTC, datetime, timedelta

from bitray.cli.args import address_parent, non_negative_float, positive_float
from bitray.errors import BitrayError

ADDRESS_HELP = "Ray dashboard address, e.g. http://HEAD:8265 (default: RAY_ADDRESS)"


def register(subparsers: argparse._SubParsersAction) -> None:
    common = address_parent(ADDRESS_HELP)
    submit = subparsers.add_parser(
        "submit",
        parents=[common],
        help="run a pipeline as a Ray job on a cluster",
        description="Submit `pipelines/<PIPELINE>.py --config FILE` as a Ray job. The config file and the "
        "local bitray code travel with the job; paths in the config are read on the cluster.",
    )
    submit.add_argument(
        "pipeline", choices=("embed", "finetune"), metavar="PIPELINE", help="embed or finetune"
    )
    submit.add_argument("--config", required=True, help="the pipeline's YAML config")
    submit.add_argument("--submission-id", help="job id to use (Ray refuses one it has seen); default: new")
    submit.add_argument(
        "--wait", action="store_true", help="follow the logs; exit non-zero unless it succeeds"
    )
    submit.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job"
    )
    submit.add_argument(
        "--no-ship-bitray",
        dest="ship_bitray",
        action="store_false",
        help="use the bitray installed on the cluster instead of uploading the local one",
    )
    submit.add_argument(
        "--pipeline-args",
        default="",
        metavar="'FLAGS'",
        help="the pipeline's own flags, quoted: --pipeline-args='--actors 1:4' (they win over the config)",
    )
    submit.set_defaults(func=cmd_submit)

    jobs = subparsers.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    actions = jobs.add_subparsers(title="actions", metavar="ACTION", required=True)
    actions.add_parser("list", parents=[common], help="every job on the cluster").set_defaults(func=cmd_list)
    status = actions.add_parser(
        "status", parents=[common], help="a job's state (exit 1 if it failed or was stopped)"
    )
    status.add_argument("id")
    status.set_defaults(func=cmd_status)
    logs = actions.add_parser("logs", parents=[common], help="a job's logs")
    logs.add_argument("id")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    logs.set_defaults(func=cmd_logs)
    stop = actions.add_parser("stop", parents=[common], help="stop a running job")
    stop.add_argument("id")
    stop.set_defaults(func=cmd_stop)

    schedule = subparsers.add_parser(
        "schedule",
        parents=[common],
        help="submit an incremental embedding job once per cron window (keeps running)",
        description="Each cron window (UTC) submits one incremental embedding job with the id "
        "bitray-embed-<config digest>-<window start>, so no window ever runs twice, even after a restart. "
        "A window that finds the previous job running is skipped. Every window is logged to MLflow "
        "(experiment bitray-embed).",
    )
    schedule.add_argument("--cron", required=True, help="cron expression, UTC, e.g. '0 * * * *'")
    schedule.add_argument("--config", required=True, help="the embedding YAML config")
    schedule.add_argument(
        "--catch-up",
        choices=("skip", "latest", "all"),
        default="skip",
        help="windows missed while the scheduler was down: skip them (default), run the newest, or run all",
    )
    schedule.add_argument("--state", help="state file (local or s3://); default: in the bitray cache dir")
    schedule.add_argument(
        "--grace",
        type=non_negative_float,
        default=60.0,
        help="seconds after a window's start it still counts as on time (default 60)",
    )
    schedule.add_argument(
        "--poll", type=positive_float, default=30.0, help="seconds between job status checks"
    )
    schedule.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    schedule.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for each job"
    )
    schedule.set_defaults(func=cmd_schedule)


def parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BitrayError(f"--env {pair!r}: write it as KEY=VALUE")
        env[key] = value
    return env


def cmd_submit(args: argparse.Namespace) -> int:
    from bitray.jobs import Jobs, check_succeeded

    jobs = Jobs(args.address)
    job_id = jobs.submit(
        args.pipeline,
        args.config,
        submission_id=args.submission_id,
        env=parse_env(args.env),
        extra_args=shlex.split(args.pipeline_args),
        ship_bitray=args.ship_bitray,
    )
    print(job_id, flush=True)
    if not args.wait:
        print(f"follow it with: bitray jobs logs --follow {job_id}", file=sys.stderr)
        return 0
    check_succeeded(jobs.follow(job_id, write=_write))  # the logs were just streamed
    print(f"job {job_id} succeeded", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from bitray.jobs import Jobs

    rows = [("ID", "STATUS", "STARTED (UTC)", "PIPELINE", "ENTRYPOINT")]
    for job in Jobs(args.address).list():
        started = (
            datetime.fromtimestamp(job.start_time, UTC).strftime("%Y-%m-%d %H:%M:%S")
            if job.start_time
            else "-"
        )
        rows.append(
            (
                job.submission_id,
                job.status,
                started,
                job.metadata.get("bitray.pipeline", "-"),
                job.entrypoint[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from bitray.jobs import Jobs

    info = Jobs(args.address).status(args.id)
    print(info.status)
    if info.message:
        print(info.message.strip())
    if info.start_time and info.end_time:
        print(f"ran for {timedelta(seconds=round(info.end_time - info.start_time))}")
    return 1 if info.status in ("FAILED", "STOPPED") else 0


def cmd_logs(args: argparse.Namespace) -> int:
    from bitray.jobs import Jobs

    jobs = Jobs(args.address)
    if args.follow:
        info = jobs.follow(args.id, write=_write)
        return 1 if info.status in ("FAILED", "STOPPED") else 0
    sys.stdout.write(jobs.logs(args.id))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from bitray.jobs import Jobs

    info = Jobs(args.address).stop(args.id)
    print(info.status)
    if not info.is_terminal:
        raise BitrayError(f"job {args.id} is still {info.status} after the stop request; check again shortly")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from bitray.jobs import Jobs
    from bitray.schedule import Scheduler, parse_cron

    parse_cron(args.cron)  # a typo in --cron is reported before connecting to anything
    scheduler = Scheduler(
        args.cron,
        args.config,
        Jobs(args.address),
        catch_up=args.catch_up,
        state_uri=args.state,
        grace=timedelta(seconds=args.grace),
        env=parse_env(args.env),
        tracking_uri=args.tracking_uri,
    )
    scheduler.run_forever(poll_s=args.poll)
    return 0


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()
