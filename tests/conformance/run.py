"""Run the cache-tests conformance suite against cachegw in standards mode, by hand.

    .venv/bin/python tests/conformance/run.py                      # memory backend
    .venv/bin/python tests/conformance/run.py --backend redis      # a fresh redis-server
    .venv/bin/python tests/conformance/run.py --backend memory --backend redis --markdown
    .venv/bin/python tests/conformance/run.py --json out.json      # per-test results
    .venv/bin/python tests/conformance/run.py --id freshness-none  # one test, with its dump
    .venv/bin/python tests/conformance/run.py --strict             # no re-run of setup failures

Prints the required/optimal pass counts (tests whose result is true, as the package counts
its totals and as issue 7's anchors were counted) and the failing required tests, as
cache-tests.fyi shows them (a test passes only when the tests it depends on pass too;
``*`` marks a test whose own result is true but a dependency failed); ``--optimal`` lists
the failing optimal tests too. ``--markdown`` prints the tables for docs/conformance.md:
the anchors measured for issue 7 with cachegw's row per backend, and the per-test
differences against the nginx and Varnish results published with the package.
Needs node and npm (runs ``npm ci`` here when node_modules is missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        action="append",
        choices=["memory", "redis"],
        help="backend to measure (repeatable; default: memory)",
    )
    parser.add_argument("--json", type=Path, help="write per-test results here")
    parser.add_argument("--markdown", action="store_true", help="print the docs table")
    parser.add_argument("--optimal", action="store_true", help="list failing optimal tests too")
    parser.add_argument(
        "--id", help="run these tests (comma-separated ids) and print their request/response dump"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="count a failed PUT /config as a failure (cache-tests.fyi's numbers) instead of "
        "re-running those tests once",
    )
    args = parser.parse_args(argv)
    backends = args.backend or ["memory"]

    missing = harness.missing_tools()
    if missing:
        print(f"error: {' and '.join(missing)} not on PATH", file=sys.stderr)
        return 2
    harness.ensure_installed()

    if args.id:
        for backend in backends:
            with (
                harness.backend_url(backend) as url,
                harness.origin() as upstream,
                harness.gateway(upstream, url) as base,
            ):
                print(harness.run_suite(base, args.id.split(","), dump=True)["dump"])
        return 0

    scores = []
    for backend in backends:
        with harness.backend_url(backend) as url:
            score = harness.measure(url, label=backend, rerun_setup=not args.strict)
        scores.append(score)
        print(score.summary())
        print(f"failing required tests ({len(score.failing('required'))}):")
        print(harness.describe_failures(score, "required"))
        if args.optimal:
            print(f"failing optimal tests ({len(score.failing('optimal'))}):")
            print(harness.describe_failures(score, "optimal"))
        print()
    if args.json:
        payload = {s.backend: s.to_json() for s in scores}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        print(harness.markdown_table(scores))
        print()
        print(
            f"Per-test differences ({scores[0].backend} backend) against the published "
            f"results shipped in {harness.PACKAGE} {harness.package_version()}:\n"
        )
        print(harness.markdown_diff(scores[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
