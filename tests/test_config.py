"""TOML gateway file → Gateway: the good file, and one clear message per bad case."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachegw import CachePolicy, ConfigError
from cachegw._gateway import Gateway

load_gateway = Gateway.from_toml

GOOD = """\
[cache]
backend = "memory"
prefix = "cachegw"
max_entries = 10000
max_bytes = "64MiB"
status_header = "X-Cache"

[admin]
token_env = "CACHEGW_ADMIN_TOKEN"

[[services]]
name = "catalog"
upstream = "http://127.0.0.1:9001"
prefix = "/catalog"
ttl = 30
timeout = 10
vary = ["Accept"]

  [[services.routes]]
  path = "/items/{item_id}"
  ttl = 60
  vary = ["Accept-Language"]
  tags = ["items", "item:{item_id}"]
  stale_while_revalidate = 30
  stale_if_error = "5m"

  [[services.routes]]
  path = "/search"
  methods = ["get"]
  max_body = "2MiB"

  [[services.routes]]
  path = "/{rest:path}"
  ttl = 0

[[services]]
name = "users"
upstream = "http://127.0.0.1:9002/api/"
ttl = 0
max_ttl = "1h"

  [[services.routes]]
  path = "/{rest:path}"
"""


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_gateway(write(tmp_path, text))
    message = str(info.value)
    assert message.startswith(str(tmp_path / "gateway.toml") + ": ")
    return message


def test_good_file(tmp_path: Path) -> None:
    gateway = load_gateway(write(tmp_path, GOOD))
    assert isinstance(gateway, Gateway)
    assert gateway.backend == "memory"
    assert gateway.prefix == "cachegw"
    assert gateway.max_entries == 10_000
    assert gateway.max_bytes == 64 * 1024 * 1024
    assert gateway.status_header == "X-Cache"
    assert gateway.admin_token_env == "CACHEGW_ADMIN_TOKEN"
    assert gateway.source == str(tmp_path / "gateway.toml")

    catalog, users = gateway.services
    assert (catalog.name, catalog.upstream, catalog.prefix, catalog.timeout) == (
        "catalog",
        "http://127.0.0.1:9001",
        "/catalog",
        10.0,
    )
    assert [r.path for r in catalog.routes] == ["/items/{item_id}", "/search", "/{rest:path}"]
    items, search, rest = (r.policy for r in catalog.routes)
    assert items == CachePolicy(
        ttl=60,
        vary=["Accept-Language"],
        tags=["items", "item:{item_id}"],
        stale_while_revalidate=30,
        stale_if_error=300,
    )
    # Inherits every knob it does not set from the service.
    assert search == CachePolicy(ttl=30, vary=["Accept"], methods=["GET"], max_body=2 << 20)
    # max_ttl follows the route's own ttl.
    assert (rest.ttl, rest.max_ttl, rest.vary) == (0, 0, ("accept",))

    assert (users.upstream, users.prefix) == ("http://127.0.0.1:9002/api", "")
    assert users.routes[0].policy == CachePolicy(ttl=0, max_ttl=3600)


def test_defaults(tmp_path: Path) -> None:
    gateway = load_gateway(
        write(
            tmp_path,
            '[[services]]\nname = "a"\nupstream = "http://a"\n[[services.routes]]\npath = "/"\n',
        )
    )
    assert (gateway.backend, gateway.prefix, gateway.admin_token_env) == ("memory", "cachegw", None)
    assert gateway.services[0].routes[0].policy == CachePolicy()


def test_from_toml_is_load_gateway(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert [s.name for s in Gateway.from_toml(str(path)).services] == ["catalog", "users"]


def test_redis_backends(tmp_path: Path) -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://h:6380/1", "redis+cluster://h:7000"):
        text = GOOD.replace('backend = "memory"', f'backend = "{url}"')
        assert load_gateway(write(tmp_path, text)).backend == url


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read the file: No such file"):
        load_gateway(tmp_path / "nope.toml")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_gateway(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_bytes(b'[cache]\nprefix = "\xff"\n')
    with pytest.raises(ConfigError, match=r"gateway\.toml: is not UTF-8"):
        load_gateway(path)


def test_invalid_toml_has_line_and_column(tmp_path: Path) -> None:
    message = error(tmp_path, GOOD.replace("ttl = 30", "ttl = [", 1))
    assert "invalid TOML" in message
    assert "line 16, column" in message


# Each case: (replace this, with that), then substrings the message must contain:
# the key path and the expected form.
BAD = {
    "negative ttl": (
        ("ttl = 60", "ttl = -5"),
        [
            "services[0].routes[0].ttl must be a number of seconds ≥ 0 "
            "(or a string like '90s', '5m', '1h'), got -5"
        ],
    ),
    "bad duration string": (
        ('stale_if_error = "5m"', 'stale_if_error = "5 minutes"'),
        ["services[0].routes[0].stale_if_error must be a number of seconds", "'5 minutes'"],
    ),
    "service knob": (
        ("ttl = 30", "ttl = true"),
        ["services[0].ttl must be a number of seconds ≥ 0", "got true"],
    ),
    "max_ttl below inherited ttl": (
        ("ttl = 30", "ttl = 30\nmax_ttl = 40"),
        [
            "services[0].routes[0]: max_ttl must be ≥ ttl (60), got 40",
            "inherited from services[0].max_ttl",
        ],
    ),
    "values as written, in TOML": (
        ("ttl = 60", 'ttl = "5m"\nmax_ttl = "1m"'),
        ["services[0].routes[0].max_ttl must be ≥ ttl ('5m'), got '1m'"],
    ),
    "booleans in a list, in TOML": (
        ('vary = ["Accept-Language"]', 'vary = ["Accept-Language", true]'),
        [
            "services[0].routes[0].vary must be a list of header names",
            "got ['Accept-Language', true]",
        ],
    ),
    "vary type": (
        ('vary = ["Accept-Language"]', "vary = 5"),
        ["services[0].routes[0].vary must be a list of header names, got 5"],
    ),
    "tags type": (
        ('tags = ["items", "item:{item_id}"]', "tags = [1]"),
        ["services[0].routes[0].tags must be a list of non-empty strings"],
    ),
    "methods": (
        ('methods = ["get"]', 'methods = ["GET /x"]'),
        ["services[0].routes[1].methods must be a list of HTTP methods"],
    ),
    "statuses": (
        ('methods = ["get"]', "statuses = [200, 999]"),
        ["services[0].routes[1].statuses must be a list of HTTP status codes (100-599)"],
    ),
    "max_body": (
        ('max_body = "2MiB"', 'max_body = "2 furlongs"'),
        ["services[0].routes[1].max_body must be", "'2 furlongs'"],
    ),
    "unknown route key": (
        ("ttl = 60", "tll = 60"),
        [
            "unknown key 'tll' in services[0].routes[0]",
            "did you mean 'ttl'?",
            "expected one of: early_refresh, heuristic, ignore_request_cache_control, max_body,",
        ],
    ),
    "hosts not a list": (
        ("timeout = 10", 'timeout = 10\nhosts = "api.example"'),
        [
            "services[0].hosts must be a list of host names like ['api.example.com', "
            "'www.example.com:8443'] (no scheme, path or wildcard), got 'api.example'"
        ],
    ),
    "hosts with a scheme": (
        ("timeout = 10", 'timeout = 10\nhosts = ["https://api.example"]'),
        ["services[0].hosts must be a list of host names", "got ['https://api.example']"],
    ),
    "hosts empty": (
        ("timeout = 10", "timeout = 10\nhosts = []"),
        ["services[0].hosts must name at least one host (leave it out to serve any host)"],
    ),
    "forward_headers gateway-set": (
        ("timeout = 10", 'timeout = 10\nforward_headers = ["X-Forwarded-Host"]'),
        [
            "services[0].forward_headers cannot include 'X-Forwarded-Host': the gateway sets "
            "it itself (use hosts to serve and key client hosts)"
        ],
    ),
    "forward_headers routing override": (
        ("timeout = 10", 'timeout = 10\nforward_headers = ["X-HTTP-Method-Override"]'),
        [
            "services[0].forward_headers cannot include 'X-HTTP-Method-Override': it makes "
            "the upstream run another path or method"
        ],
    ),
    "forward_headers not an override": (
        ("timeout = 10", 'timeout = 10\nforward_headers = ["Accept"]'),
        ["services[0].forward_headers lists 'Accept', which is forwarded anyway", "use vary"],
    ),
    "ignore_request_cache_control": (
        ("ttl = 60", 'ttl = 60\nignore_request_cache_control = "yes"'),
        ["services[0].routes[0].ignore_request_cache_control must be true or false, got 'yes'"],
    ),
    "unknown service key": (
        ("timeout = 10", "time_out = 10"),
        ["unknown key 'time_out' in services[0]", "did you mean 'timeout'?", "upstream"],
    ),
    "unknown cache key": (
        ('max_bytes = "64MiB"', 'max_byte = "64MiB"'),
        ["unknown key 'max_byte' in cache", "did you mean 'max_bytes'?", "status_header"],
    ),
    "unknown admin key": (
        ("token_env =", "token ="),
        ["unknown key 'token' in admin", "did you mean 'token_env'?"],
    ),
    "unknown table": (
        ("[admin]", "[admn]"),
        [
            "unknown top-level table 'admn'",
            "did you mean 'admin'?",
            "admin, cache, server, services",
        ],
    ),
    "missing name": (
        ('name = "users"\n', ""),
        ["services[1] is missing the required key 'name'", "name = a name like 'catalog'"],
    ),
    "missing upstream": (
        ('upstream = "http://127.0.0.1:9002/api/"\n', ""),
        ["services[1] is missing the required key 'upstream'", "'http://127.0.0.1:9001'"],
    ),
    "missing path": (
        ('path = "/search"', 'ttl = "1m"'),
        ["services[0].routes[1] is missing the required key 'path'", "path = a route template"],
    ),
    "bad path": (
        ('path = "/search"', 'path = "search"'),
        ["services[0].routes[1].path must start with '/', got 'search'"],
    ),
    "path type": (
        ('path = "/search"', "path = 5"),
        ["services[0].routes[1].path must start with '/', got 5"],
    ),
    "duplicate route": (
        ('path = "/search"', 'path = "/items/{item_id}"'),
        ["services[0].routes[1]: route '/items/{item_id}' is declared twice"],
    ),
    "bad name": (
        ('name = "users"', 'name = "the users"'),
        ["services[1].name must be letters, digits", "got 'the users'"],
    ),
    "duplicate name": (
        ('name = "users"', 'name = "catalog"'),
        ["services[1].name 'catalog' is used twice"],
    ),
    "duplicate prefix": (
        ("ttl = 0\nmax_ttl", 'prefix = "/catalog"\nttl = 0\nmax_ttl'),
        ["services[1].prefix '/catalog' is used twice"],
    ),
    "bad prefix": (
        ('prefix = "/catalog"', 'prefix = "catalog/"'),
        ["services[0].prefix must be '' or a path like '/catalog'", "got 'catalog/'"],
    ),
    "reserved prefix": (
        ('prefix = "/catalog"', 'prefix = "/_cachegw"'),
        ["services[0].prefix '/_cachegw' is reserved"],
    ),
    "bad upstream": (
        ('upstream = "http://127.0.0.1:9001"', 'upstream = "ftp://x"'),
        ["services[0].upstream must be an http:// or https:// URL", "got 'ftp://x'"],
    ),
    "bad timeout": (
        ("timeout = 10", "timeout = 0"),
        ["services[0].timeout must be > 0 seconds, got 0"],
    ),
    "bad read_timeout": (
        ("timeout = 10", 'timeout = 10\nread_timeout = "soon"'),
        ["services[0].read_timeout", "must be a number of seconds", "got 'soon'"],
    ),
    "bad max_connections": (
        ("timeout = 10", "timeout = 10\nmax_connections = 0"),
        ["services[0].max_connections must be a whole number ≥ 1, got 0"],
    ),
    "bad server timeout": (
        ("[admin]", '[server]\nsend_timeout = "0s"\n\n[admin]'),
        ["gateway.toml: server.send_timeout must be a number of seconds > 0", "got '0s'"],
    ),
    "bad server fields": (
        ("[admin]", "[server]\nmax_header_fields = 1.5\n\n[admin]"),
        ["server.max_header_fields must be a whole number from 1 to 10000, got 1.5"],
    ),
    "unknown server key": (
        ("[admin]", "[server]\nheader_timout = 5\n\n[admin]"),
        ["unknown key 'header_timout' in server", "did you mean 'header_timeout'?"],
    ),
    "services not an array": (
        ("[[services]]", "[services]"),
        ["invalid TOML"],
    ),
    "bad backend": (
        ('backend = "memory"', 'backend = "mysql://h"'),
        ["cache.backend must be 'memory' or a redis://", "got 'mysql://h'"],
    ),
    "bad backend url": (
        ('backend = "memory"', 'backend = "redis://h:port/0"'),
        ["cache.backend is not a valid Redis URL", "'redis://127.0.0.1:6379/0'"],
    ),
    "backend type": (
        ('backend = "memory"', "backend = 1"),
        ["cache.backend must be 'memory' or a redis:// URL", "got 1"],
    ),
    "max_bytes": (
        ('max_bytes = "64MiB"', 'max_bytes = "64 parsecs"'),
        ["cache.max_bytes must be a whole number of bytes", '"64MiB"', "got '64 parsecs'"],
    ),
    "max_entries": (
        ("max_entries = 10000", "max_entries = 0"),
        ["cache.max_entries must be a whole number ≥ 1, got 0"],
    ),
    "key prefix": (
        ('prefix = "cachegw"', 'prefix = "a {b}"'),
        ["cache.prefix must be a non-empty string", "got 'a {b}'"],
    ),
    "status header": (
        ('status_header = "X-Cache"', 'status_header = "X Cache"'),
        ["cache.status_header must be a header name like 'X-Cache-Status'"],
    ),
    "token env": (
        ('token_env = "CACHEGW_ADMIN_TOKEN"', 'token_env = "my token"'),
        ["admin.token_env must be an environment variable name, got 'my token'"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file(tmp_path: Path, case: str) -> None:
    (old, new), expected = BAD[case]
    assert old in GOOD
    message = error(tmp_path, GOOD.replace(old, new, 1))
    for part in expected:
        assert part in message


def test_service_without_routes(tmp_path: Path) -> None:
    text = '[[services]]\nname = "a"\nupstream = "http://a"\n'
    message = error(tmp_path, text)
    assert "services[0] (service 'a') declares no routes; add [[services.routes]]" in message
    assert 'path = "/{rest:path}" for a catch-all' in message
    assert error(tmp_path, text + "routes = []\n") == message


def test_no_services(tmp_path: Path) -> None:
    assert "declares no services; add a [[services]] table" in error(tmp_path, "[cache]\n")


def test_not_tables(tmp_path: Path) -> None:
    service = '[[services]]\nname = "a"\nupstream = "http://a"\n'
    assert "cache must be a table: write [cache]" in error(tmp_path, 'cache = "memory"\n' + service)
    message = error(tmp_path, service + "routes = ['/x']\n")
    assert "services[0].routes must be an array of tables" in message
    assert "[[services.routes]]" in message
    message = error(tmp_path, "services = 'a'\n")
    assert "services must be an array of tables: write each service as [[services]]" in message


def test_op_timeout_reaches_the_redis_backend(tmp_path: Path) -> None:
    """[cache] op_timeout: each Redis operation's deadline, for a busy machine or a distant
    Redis (issue 28); bad values are refused with the key named."""
    from cachegw._backends import backend_from_url

    text = GOOD.replace("[cache]\n", '[cache]\nop_timeout = "5s"\n', 1)
    assert "op_timeout" in text
    gateway = load_gateway(write(tmp_path, text))
    assert gateway.op_timeout == 5.0
    assert Gateway(services=gateway.services).op_timeout == 0.25
    backend = backend_from_url("redis://127.0.0.1:1/0", op_timeout=gateway.op_timeout)
    assert backend.op_timeout == 5.0
    for bad in ('"soon"', "0", "-1"):
        message = error(tmp_path, GOOD.replace("[cache]\n", f"[cache]\nop_timeout = {bad}\n", 1))
        assert "op_timeout" in message
