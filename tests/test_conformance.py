"""HTTP caching conformance: the cache-tests suite (npm ``http-cache-tests``, pinned in
tests/conformance/package.json) against ``cachegw serve`` in standards mode, per backend.

Each backend runs the whole suite once (~20 s): the suite's origin on 127.0.0.1, the gateway
as a real process in front of it (one catch-all route, ``ttl = 0``, ``max_ttl = 86400``), the
suite's client against the gateway. Then:

* every test in `PINNED_REQUIRED` must pass (as cache-tests.fyi counts a pass: its own
  result and those of the tests it depends on);
* the required and optimal pass counts must not fall below tests/conformance/ratchet.json;
* the cache backend must not have failed open during the run (``backend_errors`` in
  ``/_cachegw/health``): such a run measures no cache at all for some requests, at random.

When the counts rise, raise the ratchet (the failure message of the count test says by how much
  it is beaten; ``run.py`` prints the counts and failures by hand).

Needs node and npm on PATH (it runs ``npm ci`` in tests/conformance when node_modules lacks
the pinned package); skipped, with that reason, only when they are missing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conformance import harness
from redis_process import RedisProcess

_MISSING = harness.missing_tools()
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"{' and '.join(_MISSING)} not on PATH: the cache-tests conformance suite needs Node",
)

# Required tests that pass today on both backends and must keep passing. Only tests that
# passed in every measured run (memory and redis, several runs each) are listed.
PINNED_REQUIRED: tuple[str, ...] = (
    # Authorization (RFC 9111 §3.5): a response to a request with Authorization is not reused.
    "other-authorization",
    # no-store / private / no-cache (RFC 9111 §5.2.2), directives parsed case-insensitively.
    "cc-resp-no-store",
    "cc-resp-no-store-case-insensitive",
    "cc-resp-no-store-fresh",
    "cc-resp-private-shared",
    "cc-resp-no-cache",
    "cc-resp-no-cache-case-insensitive",
    # Vary (RFC 9111 §4.1): mismatches, omitted headers, 2- and 3-way, "*" in any position.
    "vary-no-match",
    "vary-omit-stored",
    "vary-omit",
    "vary-2-no-match",
    "vary-2-match-omit",
    "vary-3-no-match",
    "vary-3-order",
    "vary-star",
    "vary-syntax-star",
    "vary-syntax-star-star",
    "vary-syntax-star-star-lines",
    "vary-syntax-empty-star",
    "vary-syntax-empty-star-lines",
    "vary-syntax-star-foo",
    "vary-syntax-foo-star",
    # Invalidation of the target URI after unsafe methods (RFC 9111 §4.4), M-SEARCH forwarded.
    "invalidate-POST",
    "invalidate-PUT",
    "invalidate-DELETE",
    "invalidate-M-SEARCH",
    # ... and of same-origin Location / Content-Location targets.
    "invalidate-POST-location",
    "invalidate-POST-cl",
    "invalidate-PUT-location",
    "invalidate-PUT-cl",
    "invalidate-DELETE-location",
    "invalidate-DELETE-cl",
    # Age generated on responses served from cache (RFC 9111 §5.1); Date not rewritten.
    "other-age-gen",
    "other-date-update",
    "other-age-update-max-age",
    "other-age-update-expires",
    # An Age that is not one plain number makes a response stale.
    "age-parse-nonnumeric",
    "age-parse-negative",
    "age-parse-float",
    "age-parse-dup-0",
    # Revalidation with the stored validators, and headers updated from the 304.
    "cc-resp-must-revalidate-stale",
    "304-lm-use-stored-Test-Header",
    "304-etag-update-response-Cache-Control",
    "304-etag-update-response-Expires",
    "304-etag-update-response-Test-Header",
    # Surrogate-Control targeted at this cache overrides Cache-Control.
    "surrogate-no-store-cc-fresh",
    "surrogate-fresh-cc-nostore",
    # The Connection header list and other hop-by-hop fields are not stored (RFC 9110 §7.6.1).
    "headers-omit-headers-listed-in-Connection",
    "headers-store-Connection",
    "headers-store-Keep-Alive",
    "headers-store-Proxy-Authenticate",
    "headers-store-Proxy-Authentication-Info",
    "headers-store-Proxy-Authorization",
    "headers-store-Proxy-Connection",
    "headers-store-TE",
    "headers-store-Transfer-Encoding",
    "headers-store-Upgrade",
    # End-to-end response headers are stored and replayed.
    "headers-store-Test-Header",
    "headers-store-Cache-Control",
    "headers-store-Content-Type",
    "headers-store-ETag",
    "headers-store-Expires",
    # The query string is part of the key.
    "query-args-different",
    # Stale or zero freshness is not reused.
    "freshness-max-age-0",
    "freshness-max-age-0-expires",
    "freshness-max-age-negative",
    "freshness-expires-present",
    "status-200-stale",
    "status-404-stale",
    "status-410-stale",
    # No heuristic freshness for statuses that are not heuristically cacheable.
    "heuristic-403-not_cached",
    "heuristic-502-not_cached",
    "heuristic-503-not_cached",
    # Conditional requests answered from cache.
    "conditional-304-etag",
    "conditional-etag-precedence",
    # A range served from a stored complete response, with the newer response's headers.
    "partial-use-headers",
    # Statuses stored on explicit freshness are not reused once stale.
    "status-302-stale",
    "status-400-stale",
)


@pytest.fixture(scope="module", params=["memory", "redis"])
def conformance(request: pytest.FixtureRequest) -> Iterator[harness.Score]:
    """One full run of the suite against the gateway on one backend."""
    harness.ensure_installed()
    backend: str = request.param
    if backend == "redis":
        proc: RedisProcess = request.getfixturevalue("redis_proc")
        with proc.client() as client:
            client.flushall()
        url = proc.url
    else:
        url = "memory"
    score = harness.measure(url, label=backend)
    print(f"\n{score.summary()}")
    yield score


def _require_valid_measurement(score: harness.Score) -> None:
    """The cache backend must not fail open under the suite's load: a run in which it did
    measured an intermittently absent cache, not cachegw's HTTP semantics."""
    assert score.backend_errors == 0, (
        f"{score.backend} backend failed open {score.backend_errors} times during the run "
        f"({score.summary()})"
    )


def test_pinned_required_tests_pass(conformance: harness.Score) -> None:
    _require_valid_measurement(conformance)
    unknown = [tid for tid in PINNED_REQUIRED if tid not in conformance.outcomes]
    assert not unknown, f"pinned ids not in the suite: {unknown}"
    not_required = [tid for tid in PINNED_REQUIRED if conformance.outcomes[tid].kind != "required"]
    assert not not_required, f"pinned ids that are not required tests: {not_required}"
    failed = [conformance.outcomes[tid] for tid in PINNED_REQUIRED]
    lines = [f"  {o.id} [{o.verdict}] {o.name}\n      {o.message}" for o in failed if not o.passed]
    details = "\n".join(lines)
    assert not lines, f"{conformance.summary()}\npinned required tests failing:\n{details}"


def test_pass_counts_do_not_fall_below_the_ratchet(conformance: harness.Score) -> None:
    _require_valid_measurement(conformance)
    floor = harness.read_ratchet()[conformance.backend]
    required, optimal = conformance.required, conformance.optimal
    message = (
        f"{conformance.summary()}; ratchet ({harness.RATCHET_FILE.name}): "
        f"required {floor['required']}, optimal {floor['optimal']}\n"
        f"failing required tests:\n{harness.describe_failures(conformance, 'required')}"
    )
    assert required >= floor["required"] and optimal >= floor["optimal"], message
    if required > floor["required"] or optimal > floor["optimal"]:
        print(
            f"\n{conformance.backend}: the ratchet is beaten (required {required} > "
            f"{floor['required']} or optimal {optimal} > {floor['optimal']}): raise it in "
            f"{harness.RATCHET_FILE}"
        )
