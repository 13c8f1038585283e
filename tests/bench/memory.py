"""Memory backend RSS after 10**6 unique keys, against its configured bound (target ≤ 1.2x).

A fresh child process (so the baseline is clean: nothing allocated by an earlier run)
builds ``MemoryBackend(max_entries=..., max_bytes=...)``, reads its RSS (``VmRSS`` in
``/proc/self/status``), then stores ``--keys`` unique entries through the backend's own
set path (``set_nowait``, what the gateway engine calls) with keys shaped like cachegw's
(``cachegw:<sha256 hex>``, 72 bytes) and values of a uniformly random 100-500 bytes
(seeded), with a TTL. With the defaults the byte bound binds (``max_entries`` is larger
than the key count), so the LRU evicts all along the fill: the churn a key-cardinality
flood causes. It then reports RSS growth (RSS minus the baseline) against ``max_bytes``,
again after ``gc.collect()``, and the backend's ``stats()``.

    .venv/bin/python tests/bench/memory.py [--keys 1000000] [--max-bytes 64MiB]
                                           [--max-entries 2000000] [--json FILE]

Exit status: 0 when RSS growth ≤ 1.2 x max_bytes (after gc.collect()), 1 otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TARGET = 1.2
MIB = 1024 * 1024


def rss() -> int:
    """Resident set size of this process in bytes (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """The measurement itself; runs in a fresh interpreter."""
    sys.path.insert(0, str(ROOT))
    from cachegw import MemoryBackend
    from cachegw._backends._memory import ENTRY_OVERHEAD

    backend = MemoryBackend(max_entries=args.max_entries, max_bytes=args.max_bytes)
    rng = random.Random(6)
    blob = bytes(rng.randrange(256) for _ in range(args.max_value))
    sizes = [rng.randint(args.min_value, args.max_value) for _ in range(1000)]
    gc.collect()
    baseline = rss()
    started = time.perf_counter()
    samples = []
    step = max(1, args.keys // 10)
    for n in range(args.keys):
        key = "cachegw:" + hashlib.sha256(n.to_bytes(8, "little")).hexdigest()
        # A new bytes object per entry (a slice copies), as a real response body is.
        backend.set_nowait(key, blob[: sizes[n % 1000]], 600.0)
        if (n + 1) % step == 0:
            samples.append((n + 1, rss() - baseline))
    elapsed = time.perf_counter() - started
    grown = rss() - baseline
    gc.collect()
    grown_gc = rss() - baseline
    trimmed = None
    try:  # glibc only: hand free pages back to the OS (information, not judged)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        trimmed = rss() - baseline
    except (OSError, AttributeError):
        pass
    stats = backend.stats()
    return {
        "keys": args.keys,
        "key_bytes": len(key),
        "value_bytes": [args.min_value, args.max_value],
        "entry_overhead": ENTRY_OVERHEAD,
        "baseline_rss": baseline,
        "rss_growth": grown,
        "rss_growth_after_gc": grown_gc,
        "rss_growth_after_malloc_trim": trimmed,
        "fill_seconds": elapsed,
        "samples": samples,
        "stats": stats,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="unique keys stored")
    parser.add_argument("--max-bytes", default="64MiB", help="MemoryBackend max_bytes")
    parser.add_argument(
        "--max-entries", type=int, default=2_000_000, help="MemoryBackend max_entries"
    )
    parser.add_argument("--min-value", type=int, default=100, help="smallest value, bytes")
    parser.add_argument("--max-value", type=int, default=500, help="largest value, bytes")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0

    argv = [
        f"--keys={args.keys}", f"--max-bytes={args.max_bytes}",
        f"--max-entries={args.max_entries}", f"--min-value={args.min_value}",
        f"--max-value={args.max_value}",
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    stats = doc["stats"]
    bound = stats["max_bytes"]
    print(
        f"MemoryBackend(max_entries={stats['max_entries']:,}, max_bytes={bound:,} "
        f"= {bound / MIB:.0f} MiB), ENTRY_OVERHEAD {doc['entry_overhead']} bytes"
    )
    print(
        f"{doc['keys']:,} unique keys of {doc['key_bytes']} bytes, values "
        f"{doc['value_bytes'][0]}-{doc['value_bytes'][1]} bytes, through set_nowait "
        f"in {doc['fill_seconds']:.1f} s, in a fresh process (baseline RSS "
        f"{doc['baseline_rss'] / MIB:.1f} MiB)"
    )
    print("RSS growth during the fill: " + ", ".join(
        f"{n // 1000:,}k {g / MIB:.1f} MiB" for n, g in doc["samples"]
    ))  # fmt: skip
    print(f"stats(): {stats}")
    print(f"accounted bytes / max_bytes: {stats['bytes'] / bound:.3f}")
    print()
    print(
        f"{'measure':34s} {'RSS growth':>12s} {'bound':>10s} {'ratio':>7s}  verdict (≤ {TARGET}x)"
    )
    rows = [
        ("after 10^6 keys", doc["rss_growth"], True),
        ("after gc.collect()", doc["rss_growth_after_gc"], True),
        ("after malloc_trim(0) (info)", doc["rss_growth_after_malloc_trim"], False),
    ]
    failed = False
    for name, grown, judged in rows:
        if grown is None:
            continue
        ratio = grown / bound
        verdict = ("PASS" if ratio <= TARGET else "FAIL") if judged else "info"
        failed |= judged and ratio > TARGET
        print(f"{name:34s} {grown / MIB:8.1f} MiB {bound / MIB:6.0f} MiB {ratio:6.3f}x  {verdict}")
    if args.json is not None:
        args.json.write_text(json.dumps({"benchmark": "tests/bench/memory.py", **doc}, indent=2))
        print(f"results written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
