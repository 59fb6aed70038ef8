"""Headless notebook reports: papermill executes a notebook with parameters, nbconvert renders HTML with the code
hidden, and reports/index.html lists every report with its date and headline figures."""

from __future__ import annotations

import datetime as dt
import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvbatch import defaults
from kvbatch.batch.run.summary import Summary
from kvbatch.batch.runfolder import RunFolder
from kvbatch.defaults import NOTEBOOKS_DIR, REPORTS_DIR, RUNS_DIR
from kvbatch.errors import KvbatchError, UserInputError

INDEX_FILE = "index.json"


def render_notebook(
    notebook: Path,
    parameters: dict[str, Any],
    out_stem: str,
    *,
    headline: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
    title: str | None = None,
) -> Path:
    """Execute `notebook` with `parameters` into reports/<out_stem>.ipynb and .html; return the HTML path."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    if not Path(notebook).is_file():
        raise KvbatchError(f"the notebook {notebook} is not there; kvbatch renders reports from its checkout")
    REPORTS_DIR.mkdir(parents=True, exist_ok=True)
    executed = REPORTS_DIR / f"{out_stem}.ipynb"
    try:
        papermill.execute_notebook(
            str(notebook),
            str(executed),
            parameters=parameters,
            kernel_name="python3",
            progress_bar=False,
            cwd=str(Path.cwd()),
            # Unix sockets to the kernel, not TCP: nothing to eavesdrop on, and no "[IPKernelApp] WARNING | Kernel is
            # running over TCP without encryption" in the user's terminal while a report renders.
            config=Config({"KernelManager": {"transport": "ipc"}}),
            start_timeout=defaults.KERNEL_START_TIMEOUT_S,
        )
    except papermill.PapermillExecutionError as exc:
        raise KvbatchError(
            f"{notebook} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue} "
            f"(executed notebook kept at {executed})"
        ) from exc
    except (RuntimeError, TimeoutError) as exc:  # the kernel did not start, or stopped answering
        raise KvbatchError(f"{notebook} could not be executed: {exc} (the run's results are saved)") from exc
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    out = REPORTS_DIR / f"{out_stem}.html"
    out.write_text(body, "utf-8")
    _update_index(out, title or out_stem, (headline() if callable(headline) else headline) or {})
    return out


def _update_index(report: Path, title: str, headline: dict[str, Any]) -> None:
    index_path = REPORTS_DIR / INDEX_FILE
    entries = json.loads(index_path.read_text()) if index_path.exists() else {}
    entries[report.name] = {
        "title": title,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "headline": headline,
    }
    index_path.write_text(json.dumps(entries, indent=2, default=str))
    rows = []
    for name, entry in sorted(entries.items(), key=lambda item: item[1]["date"], reverse=True):
        figures = "; ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in entry["headline"].items())
        rows.append(
            f'<tr><td><a href="{html.escape(name)}">{html.escape(entry["title"])}</a></td>'
            f"<td>{html.escape(entry['date'])}</td><td>{figures}</td></tr>"
        )
    (REPORTS_DIR / "index.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>kvbatch reports</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 12px;text-align:left}"
        "tr:nth-child(even){background:#f4f4f4}</style></head><body><h1>kvbatch reports</h1>"
        "<table><tr><th>report</th><th>date</th><th>headline figures</th></tr>"
        + "".join(rows)
        + "</table></body></html>",
        "utf-8",
    )


def newest_run(runs_dir: Path = RUNS_DIR) -> Path:
    runs = sorted((p for p in runs_dir.glob("*") if RunFolder(p).is_run()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UserInputError(f"no runs in {runs_dir}; run `make batch` first")
    return runs[-1]


def render_run_report(run_dir: Path) -> Path:
    """The run report: throughput and memory over time, cache hits, tokens saved, the plan, the errors."""
    summary = Summary.fields(RunFolder(Path(run_dir)).summary)
    headline = {
        "done": summary.get("completed_total"),
        "failed": summary.get("failed_total"),
        "req/s": summary.get("requests_per_s"),
        "system prompt from cache": f"{summary['system_prompt_share_served_from_cache']:.1%}"
        if summary.get("system_prompt_share_served_from_cache") is not None
        else None,
    }
    return render_notebook(
        NOTEBOOKS_DIR / "run_report.ipynb",
        {"run_dir": str(run_dir)},
        f"run-{Path(run_dir).name}",
        headline=headline,
        title=f"run {Path(run_dir).name}",
    )
