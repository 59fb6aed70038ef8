"""The batch commands: `kvbatch run` (and its report), `plan`, `sample`, `report` and `export`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvbatch import defaults
from kvbatch.batch.inputs.sample import write_sample
from kvbatch.batch.plan.plan_record import plan_document
from kvbatch.batch.run.runner import plan_only, run_batch
from kvbatch.batch.run.summary import Summary
from kvbatch.batch.runfolder import RunFolder
from kvbatch.cli.settings import settings_from_args
from kvbatch.errors import EXIT_DONE, EXIT_INTERRUPTED, EXIT_SOME_FAILED, KvbatchError, UserInputError, exit_code
from kvbatch.report.render import newest_run, render_run_report
from kvbatch.report.results import EXPORT_FORMATS, answer_overview, export_results, load_results, write_table
from kvbatch.serve.backends import public_url


def cmd_run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        outcome = run_batch(settings)
    except KeyboardInterrupt:  # summary.json is written for what was done; the report too
        print("stopped (Ctrl-C). Every finished request is saved; run the same command to resume.", file=sys.stderr)
        if settings.folder.summary.exists():
            _answers(settings.folder)
            if not args.no_report:
                _report(settings.folder.path)
        return EXIT_INTERRUPTED
    print(outcome.message)
    if outcome.plan is None and outcome.summary is None:
        return EXIT_DONE
    _answers(outcome.folder)
    if not args.no_report:
        _report(outcome.folder.path)
    if outcome.stopped is not None:
        print(f"kvbatch run: stopped: {outcome.stopped}", file=sys.stderr)
        return exit_code(outcome.stopped)
    return EXIT_SOME_FAILED if outcome.summary and outcome.summary.failed_total else EXIT_DONE


def _answers(folder: RunFolder) -> None:
    """A run ends with its answers as one table in its folder (every invocation writes it again, so it holds the
    whole run) and, for JSON answers, each field's counts: what the report charts, on the terminal. A run too large
    to hold in this process is told the export line instead."""
    summary = Summary.read(folder.summary)
    finished = summary.completed_total + summary.failed_total if summary else 0
    export = f"kvbatch export {folder.path} --out answers.parquet"
    if finished > defaults.ANSWERS_TABLE_AT_END_MAX_ROWS:
        print(f"answers: {finished} rows: `{export}` writes them as one table; the report charts each JSON field")
        return
    try:
        frame = load_results(folder.path)
        if frame.empty:
            return
        rows = write_table(frame, folder.answers_table, "csv")
    except (KvbatchError, OSError, ValueError) as exc:  # the results stand (an answer pandas cannot hold, a disk)
        print(f"no answers table ({type(exc).__name__}: {exc}); make one with `{export}`")
        return
    print(f"answers: {rows} rows in {folder.answers_table} (`kvbatch export` writes Parquet or JSON lines)")
    for line in answer_overview(frame):
        print(f"  {line}")


def _report(run_dir: Path) -> None:
    try:
        print(f"report: {render_run_report(run_dir)}")
    except KvbatchError as exc:  # the run's results stand: say why there is no report, and how to make it
        print(f"no report ({exc}); make it later with `kvbatch report --run {run_dir}`")


def cmd_plan(args: argparse.Namespace) -> int:
    quiet = args.json
    prepared = plan_only(settings_from_args(args), say=(lambda *_: None) if quiet else print)
    if quiet:
        print(json.dumps(plan_document([endpoint.plan.record() for endpoint in prepared.plans]), indent=2))
        return 0
    for index, endpoint in enumerate(prepared.plans):
        if len(prepared.plans) > 1:
            print(f"[endpoint {index}: {public_url(endpoint.spec.url) or endpoint.spec.kind}]")
        print(endpoint.plan.describe())
    print(f"planned {prepared.plan.request_count} requests; nothing was run")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    path = write_sample(Path(args.out), args.n, seed=args.seed, max_tokens=args.max_tokens,
                        json_answer=args.json)  # fmt: skip
    print(f"wrote {args.n} requests to {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    folder = RunFolder.named(args.run) if args.run else RunFolder(newest_run())
    if not folder.is_run():
        raise UserInputError(f"{folder.path} is not a run folder (no run.json); run `make batch` first")
    print(f"report: {render_run_report(folder.path)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    folder = RunFolder.named(args.run)
    if not folder.is_run():
        raise UserInputError(f"{folder.path} is not a run folder (no run.json)")
    out = Path(args.out)
    fmt = args.format or out.suffix.lstrip(".").lower()
    if fmt not in EXPORT_FORMATS:
        raise UserInputError(f"--out {out}: say --format ({', '.join(EXPORT_FORMATS)}); the suffix does not tell")
    rows = export_results(folder.path, out, fmt)
    print(f"{rows} rows ({fmt}): {out}")
    return 0
