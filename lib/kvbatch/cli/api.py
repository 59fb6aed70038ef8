"""`kvbatch api`: the OpenAI Batch API served on this machine."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kvbatch.aio import run_sync
from kvbatch.api.service import api_key_from, serve
from kvbatch.cli.settings import settings_from_args
from kvbatch.errors import UserInputError


def cmd_api(args: argparse.Namespace) -> int:
    key = api_key_from(args.api_key_env, args.host)
    secret = os.environ.get(args.webhook_secret_env) if args.webhook_secret_env else None
    if args.webhook_secret_env and not secret:
        raise UserInputError(f"--webhook-secret-env {args.webhook_secret_env}: that environment variable is not set")
    args.input, args.run = "api-batch.jsonl", "api"  # each batch's own file and run folder replace them
    settings = settings_from_args(args)
    run_sync(serve(settings, data=Path(args.data), host=args.host, port=args.port, api_key=key,
                   webhook_url=args.webhook_url, webhook_secret=secret, report=not args.no_report,
                   batch_webhook_prefixes=tuple(args.batch_webhook_prefix)))  # fmt: skip
    return 0
