"""Kept for notebooks and users: `from kvbatch.results import load_results`. The code lives in kvbatch.report."""

from kvbatch.report.results import (  # noqa: F401
    load_errors,
    load_events,
    load_memory,
    load_metrics,
    load_plan,
    load_results,
    load_summary,
    throughput_per_interval,
)
