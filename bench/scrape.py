"""Scrapes a server's /metrics while a workload runs, as Prometheus would, but more often."""

from __future__ import annotations

import threading
import time
import urllib.request

# Prometheus scrapes every 15 s by default; once a second makes any scrape cost 15x easier to see.
INTERVAL_S = 1.0


class Scraper:
    """A thread fetching ``url`` every INTERVAL_S until stopped; keeps each scrape's duration."""

    def __init__(self, url: str):
        self.url = url
        self.durations_ms: list[float] = []
        self.sizes: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    self.sizes.append(len(response.read()))
                self.durations_ms.append((time.perf_counter() - began) * 1000)
            except OSError as exc:
                self.errors.append(str(exc))
            self._stop.wait(INTERVAL_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
