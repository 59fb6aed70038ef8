"""The status page at `/`: every batch with its state, a progress bar, throughput, ETA, prefix-cache share, memory
against the budget, errors, and links to its files and its HTML report. It reloads itself; every value from a
user's input is escaped."""

from __future__ import annotations

import html
import itertools

from kvbatch import defaults
from kvbatch.api.models import BatchObject, WebhookDelivery
from kvbatch.units import format_bytes

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 0.4rem 0.6rem; border-bottom: 1px solid #ddd; vertical-align: top; }
.bar { width: 12rem; height: 0.9rem; background: #eee; border-radius: 0.3rem; overflow: hidden; }
.bar > div { height: 100%; background: #2a7ae2; }
.failed, .cancelled, .given_up { color: #b00020; } .completed { color: #1b7f3b; }
small { color: #666; }
"""


def _eta(batch: BatchObject) -> str:
    counts, rate = batch.request_counts, batch.x_kvbatch.get("requests_per_s")
    left = counts.total - counts.completed - counts.failed
    if batch.status != "in_progress" or not rate or left <= 0:
        return ""
    seconds = left / rate
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 60 else \
        f"{seconds:.0f} s"  # fmt: skip


def _link(path: str, text: str) -> str:
    return f'<a href="{html.escape(path)}">{html.escape(text)}</a>'


def _throughput(points: list) -> str:
    """Requests per second between the batch's saved points, drawn as a small SVG line (no script, no library)."""
    rates = [(t1, (d1 - d0) / (t1 - t0)) for (t0, d0), (t1, d1) in itertools.pairwise(points) if t1 > t0]
    if len(rates) < 2:
        return ""
    start, span = rates[0][0], (rates[-1][0] - rates[0][0]) or 1.0
    top = max(rate for _, rate in rates) or 1.0
    line = " ".join(f"{(t - start) / span * 200:.1f},{40 - rate / top * 38:.1f}" for t, rate in rates)
    return (f'<svg class="throughput" data-points="{len(rates)}" width="200" height="42" viewBox="0 0 200 42">'
            f"<title>requests/s over the run (at most {top:.2f})</title>"
            f'<polyline points="{line}" fill="none" stroke="#2a7ae2" stroke-width="1.5"/></svg>')  # fmt: skip


def _failures(batch: BatchObject) -> str:
    """The first failed requests, each with its reason (the error file has them all)."""
    failures = batch.x_kvbatch.get("failures") or []
    if not failures:
        return ""
    items = "".join(f'<li data-failed="{html.escape(f["custom_id"])}"><code>{html.escape(f["custom_id"])}</code>: '
                    f'{html.escape(f["message"])}</li>' for f in failures)  # fmt: skip
    more = batch.request_counts.failed - len(failures)
    tail = f"<li>... and {more:,} more in the error file</li>" if more > 0 else ""
    return f"<details><summary>failed requests</summary><ul>{items}{tail}</ul></details>"


def _row(batch: BatchObject) -> str:
    counts, extra = batch.request_counts, batch.x_kvbatch
    done = counts.completed + counts.failed
    share = done / counts.total if counts.total else (1.0 if batch.status == "completed" else 0.0)
    rate = extra.get("requests_per_s")
    cache = extra.get("cache_share")
    memory, planned, budget = extra.get("memory_bytes"), extra.get("planned_bytes"), extra.get("budget_bytes")
    memory_text = " / ".join(part for part in (
        f"{format_bytes(memory)} now" if memory else "", f"{format_bytes(planned)} planned" if planned else "",
        f"{format_bytes(budget)} budget" if budget else "") if part)  # fmt: skip
    errors = [f"{counts.failed} failed"] if counts.failed else []
    if batch.errors and batch.errors.data:
        errors += [f"line {e.line}: {e.message}" if e.line else e.message for e in batch.errors.data[:5]]
    if extra.get("last_stop"):
        errors.append(f"stopped, will go on: {extra['last_stop']}")
    links = [_link(f"/v1/files/{batch.input_file_id}/content", "input")]
    if batch.output_file_id:
        links.append(_link(f"/v1/files/{batch.output_file_id}/content", "output"))
    if batch.error_file_id:
        links.append(_link(f"/v1/files/{batch.error_file_id}/content", "errors"))
    if extra.get("report"):
        links.append(_link(f"/reports/{extra['report']}", "report"))
    elif batch.status == "in_progress" and extra.get("run_folder"):
        links.append(_link(f"/batches/{batch.id}/report", "report so far"))
    plan = html.escape(str(extra.get("plan") or "")).replace("\n", "<br>")
    return (
        f'<tr data-batch="{html.escape(batch.id)}"><td>{html.escape(batch.id)}<br><small>'
        f"{html.escape(', '.join(f'{k}={v}' for k, v in (batch.metadata or {}).items()))}</small></td>"
        f'<td class="{batch.status}">{batch.status}</td>'
        f'<td><div class="bar" title="{share:.0%}"><div style="width:{share * 100:.1f}%"></div></div>'
        f"<small>{done:,} of {counts.total:,} ({share:.0%})</small></td>"
        f"<td>{f'{rate:.2f} req/s' if rate else ''}{_throughput(extra.get('throughput') or [])}</td>"
        f"<td>{_eta(batch)}</td>"
        f"<td>{f'{cache:.0%}' if cache is not None else ''}</td><td>{html.escape(memory_text)}</td>"
        f"<td>{'<br>'.join(html.escape(e) for e in errors)}{_failures(batch)}</td><td>{' · '.join(links)}</td>"
        f"<td><details><summary>plan</summary><small>{plan}</small></details></td></tr>"
    )


def _outbox(deliveries: list[WebhookDelivery], counts: dict[str, int]) -> str:
    """The webhook outbox: counts, and each event not (yet) delivered with its receiver, attempts and last error."""
    if not deliveries:
        return ""
    rows = "".join(
        f'<tr data-delivery="{html.escape(d.event_id)}"><td>{html.escape(d.event_type)}</td>'
        f"<td>{html.escape(d.batch_id)}</td><td>{html.escape(d.url)}</td><td class=\"{d.state}\">"
        f"{d.state.replace('_', ' ')}</td><td>{d.attempts}</td><td>{html.escape(d.last_error or '')}</td></tr>"
        for d in deliveries if d.state != "delivered"
    )  # fmt: skip
    table = ("<table><thead><tr><th>event</th><th>batch</th><th>receiver</th><th>state</th><th>attempts</th>"
             f"<th>last error</th></tr></thead><tbody>{rows}</tbody></table>") if rows else ""  # fmt: skip
    summary = ", ".join(f"{n} {state.replace('_', ' ')}" for state, n in counts.items())
    return f'<h2>Webhooks</h2><p id="outbox">{summary}</p>{table}'


def status_page(batches: list[BatchObject], *, deliveries: list[WebhookDelivery] = (),
                delivery_counts: dict[str, int] | None = None, keyed: bool = False) -> str:  # fmt: skip
    """`keyed`: the service asks for a key, so the page offers to log out."""
    rows = "".join(_row(b) for b in batches) or '<tr><td colspan="10">No batches yet.</td></tr>'
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>kvbatch batches</title>"
        f"<meta http-equiv='refresh' content='{defaults.API_PAGE_REFRESH_S}'><style>{_STYLE}</style></head><body>"
        "<h1>kvbatch batches</h1>"
        + ('<form method="post" action="/logout"><button>Log out</button></form>' if keyed else "")
        + "<p>OpenAI Batch API at <code>/v1</code>; one batch runs at a time, the others wait "
        "in order. This page reloads itself.</p><table><thead><tr><th>batch</th><th>state</th><th>progress</th>"
        "<th>throughput</th><th>ETA</th><th>prefix cache</th><th>memory</th><th>errors</th><th>files</th>"
        f"<th></th></tr></thead><tbody>{rows}</tbody></table>"
        f"{_outbox(list(deliveries), delivery_counts or {})}</body></html>"
    )


def login_page(*, refused: bool = False) -> str:
    """The key asked once, in a form (never in a URL); the answer is an HttpOnly cookie the page and its links use."""
    note = "<p class='failed'>That is not the key this service was started with.</p>" if refused else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>kvbatch: log in</title>"
        f"<style>{_STYLE}</style></head><body><h1>kvbatch batches</h1>{note}"
        "<p>This service asks for its API key (the one its clients send as <code>Authorization: Bearer</code>).</p>"
        '<form method="post" action="/login"><label>API key <input type="password" name="key" '
        'autocomplete="current-password" autofocus></label> <button type="submit">Open</button></form></body></html>'
    )
