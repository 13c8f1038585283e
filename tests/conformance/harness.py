"""Run the cache-tests suite (npm ``http-cache-tests``, pinned in package.json) against cachegw.

Shared by ``tests/test_conformance.py`` and ``tests/conformance/run.py``:

* `ensure_installed()` runs ``npm ci`` here when ``node_modules`` lacks the package;
* `origin()` starts the suite's origin server (``origin.mjs``: the package's own handlers,
  listening on 127.0.0.1 only) and yields its base URL;
* `gateway()` writes a standards-mode gateway file (one service with prefix ``""`` in front
  of the origin, one catch-all route with ``ttl = 0`` and ``max_ttl = 86400``) and runs
  ``python -m cachegw serve`` on it as a real process, until ``/_cachegw/health`` is 200;
* `run_suite()` runs the suite's client (``client.mjs``) against the gateway and returns its
  raw results plus the test definitions; `score()` classifies each test as cache-tests.fyi does.

How the results are counted. The CLI skips ``browser_only`` tests and adds the
surrogate-control suite, as the site does: 165 required, 95 optimal and 90 check tests (350)
for version 0.4.5; a test without ``kind`` is ``required``. Two notions of "passed":

* the pass *counts* (`Score.required`, `Score.optimal`, the ratchet, the docs table) count
  tests whose result is ``true``, as the package's own totals do (lib/display.mjs
  ``renderTestResults``: ``testResults[test.id] === true``). The anchors of issue 7 are
  counted this way: the origin alone scores exactly 97 / 1 so;
* the per-test *verdict* (`Outcome.verdict`, used for the pinned tests and the failure
  lists) is the symbol cache-tests.fyi shows (lib/display.mjs ``determineTestResult`` with
  ``honorDependencies``): ``pass`` needs the result ``true`` *and* every test in
  ``depends_on`` passed, so a "must not reuse" test cannot pass just because nothing is
  ever cached; otherwise ``dependency_fail``, ``setup_fail``, ``retry``, ``fail`` /
  ``optional_fail`` / ``no``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
TESTS_DIR = HERE.parent
ROOT = TESTS_DIR.parent
PACKAGE = "http-cache-tests"
RATCHET_FILE = HERE / "ratchet.json"

# Published anchors for http-cache-tests 0.4.5 on this machine (issue 7): (required, optimal).
ANCHORS: list[tuple[str, int, int]] = [
    ("origin with no cache at all", 97, 1),
    ("nginx 1.22 proxy_cache, shared-cache config", 96, 58),
    ("Varnish 7.1, builtin VCL", 104, 58),
    ("Varnish, default_ttl=0 and grace=0", 124, 44),
    ("naive FastAPI + httpx proxy, every GET cached 60 s", 34, 72),
]
GOAL = (140, 65)

START_TIMEOUT = 20.0
SUITE_TIMEOUT = 300.0


class HarnessError(RuntimeError):
    """Something around the suite (npm, origin, gateway) did not work."""


# --- installation ------------------------------------------------------------------------


def missing_tools() -> list[str]:
    """The tools among node and npm that are not on PATH."""
    return [tool for tool in ("node", "npm") if shutil.which(tool) is None]


def package_version() -> str:
    data = json.loads((HERE / "package.json").read_text())
    return str(data["dependencies"][PACKAGE])


def installed_version() -> str | None:
    manifest = HERE / "node_modules" / PACKAGE / "package.json"
    if not manifest.is_file():
        return None
    return str(json.loads(manifest.read_text())["version"])


def ensure_installed() -> None:
    """``npm ci`` from the committed lockfile unless the pinned version is already there."""
    if installed_version() == package_version():
        return
    proc = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0 or installed_version() != package_version():
        raise HarnessError(
            f"npm ci in {HERE} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def origin() -> Iterator[str]:
    """The suite's origin server on 127.0.0.1 (a free port); yields ``http://127.0.0.1:PORT``."""
    proc = subprocess.Popen(
        ["node", str(HERE / "origin.mjs"), "0"],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    drain: _Drain | None = None
    try:
        line = proc.stdout.readline()
        prefix = "Listening on http://127.0.0.1:"
        if not line.startswith(prefix):
            _stop(proc)
            raise HarnessError(f"the cache-tests origin did not start:\n{line}{proc.stdout.read()}")
        port = int(line[len(prefix) :].strip().rstrip("/"))
        # Its later output (SERVER WARNING lines) must not fill the pipe and block it.
        drain = _Drain(proc.stdout)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)
        if drain is not None:
            drain.thread.join(timeout=5)
        proc.stdout.close()


class _Drain:
    """Read a pipe in a daemon thread, keeping the last lines for error messages."""

    def __init__(self, stream: Any) -> None:
        import collections
        import threading

        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)


def gateway_toml(upstream: str, backend: str) -> str:
    """Standards mode: plain configuration, a catch-all storing only what the upstream marks
    fresh (DESIGN.md, policy knobs: ``ttl = 0, max_ttl = 86400``), plus RFC 9111 §4.2.2
    heuristic freshness (10% of the time since ``Last-Modified``) where it is allowed."""
    return f"""\
[cache]
backend = {json.dumps(backend)}
prefix = "conformance"
# A deadline for a Redis that hangs, not for a slow machine: under load a healthy Redis
# past 250 ms made the cache fail open and the run count for nothing (issue 28).
op_timeout = "5s"

[[services]]
name = "cache-tests"
upstream = {json.dumps(upstream)}
prefix = ""
timeout = 10

  [[services.routes]]
  path = "/{{rest:path}}"
  ttl = 0
  max_ttl = 86400
  heuristic = 0.1
"""


@contextlib.contextmanager
def gateway(upstream: str, backend: str = "memory") -> Iterator[str]:
    """``cachegw serve`` in standards mode as a child process; yields its base URL.

    ``backend`` is ``"memory"`` or a ``redis://`` URL.
    """
    with tempfile.TemporaryDirectory(prefix="cachegw-conformance-") as tmp:
        config = Path(tmp) / "gateway.toml"
        config.write_text(gateway_toml(upstream, backend))
        log_path = Path(tmp) / "gateway.log"
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        env.pop("CACHEGW_ADMIN_TOKEN", None)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cachegw", "serve", str(config), "--port", str(port),
                 "--log-level", "warning"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(proc, base, log_path)
            yield base
        finally:
            _stop(proc)
            GATEWAY_LOGS[backend] = log_path.read_text(errors="replace")


# The last gateway log per backend, for error messages.
GATEWAY_LOGS: dict[str, str] = {}


def _wait_healthy(proc: subprocess.Popen[Any], base: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(trust_env=False, timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if client.get(f"{base}/_cachegw/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    _stop(proc)
    raise HarnessError(
        f"cachegw serve did not become healthy at {base} within {START_TIMEOUT} s "
        f"(exit code {proc.returncode}). Its output:\n{log_path.read_text(errors='replace')}"
    )


# --- the suite ---------------------------------------------------------------------------


def run_suite(base: str, ids: list[str] | None = None, *, dump: bool = False) -> dict[str, Any]:
    """Run the client against ``base``; returns ``{"results": ..., "tests": [...]}``.

    ``ids`` limits the run to those tests. With ``dump``, returns ``{"dump": text}``: the
    package's request/response log of every test run, to debug a failure.
    """
    args = ["node", str(HERE / "client.mjs"), base]
    if ids:
        args.append(",".join(ids))
    if dump:
        args.append("--dump")
    proc = subprocess.run(
        args, cwd=HERE, capture_output=True, text=True, timeout=SUITE_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise HarnessError(f"the cache-tests client failed:\n{proc.stdout}\n{proc.stderr}")
    if dump:
        return {"dump": proc.stdout}
    try:
        data: dict[str, Any] = json.loads(proc.stdout)
    except ValueError as exc:
        raise HarnessError(f"the cache-tests client printed no JSON:\n{proc.stdout}") from exc
    return data


def harness_setup_failures(data: dict[str, Any]) -> list[str]:
    """Tests that failed before testing anything: the suite's ``PUT /config/<uuid>`` (its
    synchronisation with its origin, sent through the gateway) did not get a 201."""
    return sorted(
        tid
        for tid, result in data["results"].items()
        if isinstance(result, list)
        and result[0] == "Setup"
        and str(result[1]).startswith("PUT config resulted in")
    )


@dataclass
class Outcome:
    id: str
    name: str
    kind: str  # required | optimal | check
    suite: str
    result: Any  # true, or [errorName, message]; None when the test did not run
    verdict: str  # pass | fail | optional_fail | yes | no | setup_fail | retry | ...
    requests: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def passed(self) -> bool:
        """Passed as cache-tests.fyi shows it: result true and its dependencies passed."""
        return self.verdict in ("pass", "yes")

    @property
    def result_true(self) -> bool:
        """The test's own result is true (what the pass counts count)."""
        return self.result is True

    @property
    def message(self) -> str:
        if self.verdict == "dependency_fail":
            return "a test it depends on failed"
        if self.result is True:
            return ""
        if isinstance(self.result, list) and len(self.result) > 1:
            return f"{self.result[0]}: {self.result[1]}"
        return repr(self.result)


@dataclass
class Score:
    outcomes: dict[str, Outcome]
    seconds: float = 0.0
    backend: str = ""
    # Tests re-run because the suite's own PUT /config failed the first time (see measure()).
    rerun: list[str] = field(default_factory=list)
    # The gateway's /_cachegw/health "stats" after the run (HIT, MISS, backend_errors, ...).
    gateway_stats: dict[str, Any] = field(default_factory=dict)
    # Summaries of earlier runs discarded because the backend failed open (see measure()).
    invalid_runs: list[str] = field(default_factory=list)

    @property
    def backend_errors(self) -> int:
        """Cache operations that failed open during the run (answered as if uncached)."""
        return int(self.gateway_stats.get("backend_errors", 0))

    def count(self, kind: str) -> tuple[int, int]:
        """(tests whose result is true, total) of one kind: the pass count."""
        of_kind = [o for o in self.outcomes.values() if o.kind == kind]
        return sum(o.result_true for o in of_kind), len(of_kind)

    def count_verdicts(self, kind: str) -> int:
        """Tests of one kind shown as passed on cache-tests.fyi (dependencies honoured)."""
        return sum(o.passed for o in self.outcomes.values() if o.kind == kind)

    @property
    def required(self) -> int:
        return self.count("required")[0]

    @property
    def optimal(self) -> int:
        return self.count("optimal")[0]

    def failing(self, kind: str) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.kind == kind and not o.passed]

    def summary(self) -> str:
        req, req_total = self.count("required")
        opt, opt_total = self.count("optimal")
        chk, chk_total = self.count("check")
        where = f" [{self.backend}]" if self.backend else ""
        rerun = (
            f"; {len(self.rerun)} re-run after PUT /config failed: {', '.join(self.rerun)}"
            if self.rerun
            else ""
        )
        if self.backend_errors:
            rerun += f"; {self.backend_errors} cache backend errors (failed open)"
        if self.invalid_runs:
            rerun += f"; {len(self.invalid_runs)} earlier run discarded (backend failed open)"
        return (
            f"cache-tests {package_version()}{where}: required {req}/{req_total}, "
            f"optimal {opt}/{opt_total}, checks yes {chk}/{chk_total} "
            f"(with dependencies honoured: required {self.count_verdicts('required')}, "
            f"optimal {self.count_verdicts('optimal')}) ({self.seconds:.1f} s{rerun})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "package": f"{PACKAGE}@{package_version()}",
            "backend": self.backend,
            "seconds": round(self.seconds, 1),
            "required": self.count("required"),
            "optimal": self.count("optimal"),
            "check": self.count("check"),
            "with_dependencies": {
                "required": self.count_verdicts("required"),
                "optimal": self.count_verdicts("optimal"),
            },
            "rerun_after_setup_failure": self.rerun,
            "discarded_runs_backend_failed_open": self.invalid_runs,
            "gateway_stats": self.gateway_stats,
            "tests": {
                o.id: {"kind": o.kind, "verdict": o.verdict, "name": o.name, "result": o.result}
                for o in self.outcomes.values()
            },
        }


def score(data: dict[str, Any]) -> Score:
    """Classify every test as lib/display.mjs ``determineTestResult`` does (dependencies on)."""
    tests = {t["id"]: t for t in data["tests"]}
    results = data["results"]
    verdicts: dict[str, str] = {}

    def verdict(test_id: str) -> str:
        if test_id in verdicts:
            return verdicts[test_id]
        test = tests[test_id]
        result = results.get(test_id)
        if result is None:
            value = "untested"
        elif any(verdict(dep) not in ("pass", "yes") for dep in test["depends_on"]):
            value = "dependency_fail"
        elif isinstance(result, list) and result and result[0] == "Setup":
            value = "retry" if len(result) > 1 and result[1] == "retry" else "setup_fail"
        elif test["kind"] == "required":
            value = "pass" if result is True else "fail"
        elif test["kind"] == "optimal":
            value = "pass" if result is True else "optional_fail"
        elif test["kind"] == "check":
            value = "yes" if result is True else "no"
        else:
            raise HarnessError(f"unknown test kind {test['kind']!r} for {test_id}")
        verdicts[test_id] = value
        return value

    outcomes = {
        tid: Outcome(
            id=tid,
            name=t["name"],
            kind=t["kind"],
            suite=t["suite"],
            result=results.get(tid),
            verdict=verdict(tid),
            requests=t.get("requests", []),
        )
        for tid, t in tests.items()
    }
    return Score(outcomes)


@contextlib.contextmanager
def backend_url(backend: str) -> Iterator[str]:
    """``"memory"`` → ``"memory"``; ``"redis"`` → the URL of a fresh redis-server."""
    if backend == "memory":
        yield "memory"
        return
    if backend != "redis":
        raise ValueError(f"backend must be 'memory' or 'redis', got {backend!r}")
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    from redis_process import RedisProcess

    with RedisProcess() as proc:
        yield proc.url


def measure(
    backend_or_url: str,
    label: str | None = None,
    *,
    rerun_setup: bool = True,
    rerun_invalid: bool = True,
) -> Score:
    """Start origin and gateway (``"memory"`` or a ``redis://`` URL), run the suite, score it.

    With ``rerun_setup`` (the default), tests whose ``PUT /config`` did not get a 201 are run
    once more, alone, and that second result counts; their ids are in ``Score.rerun`` and in
    the summary line. cache-tests.fyi counts such a test as failed (``setup_fail``): pass
    ``rerun_setup=False`` for its exact numbers. The PUT is the suite's own bookkeeping, not a
    caching check, and the gateway fails it intermittently (an upstream keep-alive race), which
    would make the pinned tests and the ratchet flaky.

    With ``rerun_invalid`` (the default), a run in which the cache backend failed open
    (``Score.backend_errors``: a Redis operation past its 0.25 s deadline, which a saturated
    2-core machine can cause by itself) is not a measurement of the cache: the whole suite
    runs once more on a fresh gateway, and that run counts (``Score.invalid_runs`` says so).
    A second invalid run is returned as it is, for the caller to fail on.

    Client connections: the suite's Node client keeps idle connections for 5 s (Node's
    http agent); the gateway keeps them 20 s (``keepalive_timeout``). With equal timeouts
    (uvicorn's default 5 s, before the ``[server]`` limits) a reused connection raced the
    gateway's close and ``PUT /config`` failed with "socket hang up" in bursts: that is a
    product setting, tested in tests/test_hostile.py, not something to retry here.
    """
    first = _measure_once(backend_or_url, label, rerun_setup=rerun_setup)
    if first.backend_errors == 0 or not rerun_invalid:
        return first
    second = _measure_once(backend_or_url, label, rerun_setup=rerun_setup)
    second.invalid_runs = [first.summary()]
    return second


def _measure_once(backend_or_url: str, label: str | None, *, rerun_setup: bool) -> Score:
    ensure_installed()
    started = time.monotonic()
    with origin() as upstream, gateway(upstream, backend_or_url) as base:
        data = run_suite(base)
        rerun = harness_setup_failures(data) if rerun_setup else []
        if rerun:
            data["results"].update(run_suite(base, rerun)["results"])
        stats = gateway_stats(base)
    result = score(data)
    result.gateway_stats = stats
    result.seconds = time.monotonic() - started
    result.backend = label or ("redis" if backend_or_url.startswith("redis") else backend_or_url)
    result.rerun = rerun
    return result


def gateway_stats(base: str) -> dict[str, Any]:
    """The engine counters from ``/_cachegw/health`` (empty when unavailable)."""
    try:
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            stats = client.get(f"{base}/_cachegw/health").json().get("stats", {})
    except (httpx.HTTPError, ValueError):
        return {}
    return dict(stats) if isinstance(stats, dict) else {}


def read_ratchet() -> dict[str, dict[str, int]]:
    data: dict[str, dict[str, int]] = json.loads(RATCHET_FILE.read_text())
    return data


# --- reports -----------------------------------------------------------------------------


def describe_failures(result: Score, kind: str) -> str:
    """Tests of ``kind`` not shown as passed; ``*`` marks those whose own result is true
    (counted as passed, but a test they depend on failed)."""
    lines = []
    for o in sorted(result.failing(kind), key=lambda o: (o.suite, o.id)):
        mark = "*" if o.result_true else " "
        lines.append(f" {mark}{o.id} [{o.verdict}] {o.name}\n      {o.message}")
    return "\n".join(lines)


def markdown_table(scores: list[Score]) -> str:
    """The docs/conformance.md table: the anchors from issue 7 and cachegw's row(s)."""
    rows = [
        f"| target | required (of {scores[0].count('required')[1]}) "
        f"| optimal (of {scores[0].count('optimal')[1]}) |",
        "|---|---:|---:|",
    ]
    rows += [f"| {name} | {req} | {opt} |" for name, req, opt in ANCHORS]
    for s in scores:
        rows.append(
            f"| **cachegw, standards mode ({s.backend} backend)** | **{s.required}** "
            f"| **{s.optimal}** |"
        )
    return "\n".join(rows)


# Published results shipped inside the package (cache-tests.fyi's data for this version):
# (file, label). Versions from results/index.mjs; they differ from the versions measured for
# issue 7's table (nginx 1.22, Varnish 7.1), whose per-test results are not available.
PUBLISHED = [
    ("nginx.json", "nginx 1.18 (cache-tests.fyi)"),
    ("varnish.json", "Varnish 6.4 (cache-tests.fyi)"),
]


def published_results(file: str) -> dict[str, Any]:
    path = HERE / "node_modules" / PACKAGE / "results" / file
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _symbol(kind: str, result: Any) -> str:
    if result is None:
        return "-"
    if result is True:
        return "✅"
    return "⛔️" if kind == "required" else "⚠️"


def markdown_diff(result: Score) -> str:
    """Required and optimal tests where cachegw's result differs from a published proxy's."""
    others = [(label, published_results(file)) for file, label in PUBLISHED]
    header = "| test | kind | cachegw | " + " | ".join(label for label, _ in others) + " |"
    rows = [header, "|---|---|:-:|" + ":-:|" * len(others)]
    for o in sorted(result.outcomes.values(), key=lambda o: (o.kind != "required", o.suite, o.id)):
        if o.kind == "check":
            continue
        mine = o.result is True
        theirs = [res.get(o.id) for _, res in others]
        if all((r is True) == mine for r in theirs):
            continue
        cells = [_symbol(o.kind, o.result), *(_symbol(o.kind, r) for r in theirs)]
        rows.append(f"| `{o.id}` | {o.kind} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
