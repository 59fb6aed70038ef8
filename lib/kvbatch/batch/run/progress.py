"""Progress for people (a tqdm bar) and for logs (a plain line every so often when not on a terminal)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from kvbatch import defaults


class Progress:
    def __init__(self, total: int | None, *, enabled: bool = True,
                 log_every_s: float = defaults.PROGRESS_LOG_EVERY_S) -> None:  # fmt: skip
        self.total = total
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.log_every_s = log_every_s
        self.done = 0
        self.errors = 0
        self.cache_share: float | None = None
        self._started = time.perf_counter()
        self._last_log = self._started
        self._bar = tqdm(total=total, unit="req", dynamic_ncols=True, smoothing=0.1) if self.interactive else None

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._started

    def rate(self) -> float:
        elapsed = self.elapsed_s()
        return self.done / elapsed if elapsed else 0.0

    def _postfix(self) -> str:
        cache = f"{self.cache_share:.1%}" if self.cache_share is not None else "?"
        return f"cache {cache}, errors {self.errors}"

    def update(self, *, ok: bool, cache_share: float | None) -> None:
        self.done += 1
        self.errors += 0 if ok else 1
        self.cache_share = cache_share
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(1)
        elif self.enabled and time.perf_counter() - self._last_log >= self.log_every_s:
            self._last_log = time.perf_counter()
            self._line()

    def _line(self) -> None:
        rate = self.rate()
        of = f"/{self.total}" if self.total else ""
        eta = f", ETA {(self.total - self.done) / rate:.0f} s" if self.total and rate else ""
        print(f"[kvbatch] {self.done}{of} requests, {rate:.2f} req/s{eta}, {self._postfix()}", file=sys.stderr,
              flush=True)  # fmt: skip

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(f"[kvbatch] {message}")
        else:
            print(f"[kvbatch] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done:
            self._line()
