#!/bin/bash
# CPU instructions per request of one server process, counted by valgrind's callgrind: a
# measure other load on the machine barely moves (unlike req/s or CPU time), for comparing
# a change before and after on a shared machine (issue 26).
#
#   tests/bench/instructions.sh ROW [SECONDS]
#
# ROW is one of
#   serve_pass         cachegw serve, GET of a ttl = 0 route (forwarded)
#   serve_post         cachegw serve, POST of 1 KiB to the ttl = 0 route
#   serve_stored_miss  cachegw serve, GET of a new key of a ttl = 3600 route (stored)
#   serve_hit          cachegw serve, GET of one key of the ttl = 3600 route (a hit after the first)
#   floor_get          the Python floor (raw ASGI + one aiohttp session), GET
#   floor_post         the Python floor, POST of 1 KiB
# Run from the repository root with its .venv; needs valgrind and wrk. The server runs
# under callgrind with instrumentation off; it is switched on for SECONDS (default 30) of
# wrk -c10 after 5 s of warm-up, and the instructions counted are divided by the requests
# wrk completed. Under valgrind a server is ~50x slower: expect a few hundred requests.
# The figure moves a few per cent with how many requests one loop iteration handles
# (more concurrency, fewer instructions each): compare rows run under like conditions.
# CALLGRIND_KEEP=FILE keeps the profile (for callgrind_annotate).
set -euo pipefail
ROW=$1; SECS=${2:-30}
for tool in valgrind callgrind_control callgrind_annotate wrk curl; do
  command -v $tool >/dev/null || { echo "needs $tool" >&2; exit 2; }
done
TMP=$(mktemp -d /tmp/cachegw-instr.XXXX)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
free_port() { .venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
UP=$(free_port); PORT=$(free_port)
.venv/bin/uvicorn --factory --app-dir tests/bench gateway_apps:upstream --port "$UP" \
  --log-level warning --no-access-log >/dev/null 2>&1 &
PIDS+=($!)
cat > "$TMP/gateway.toml" <<TOML
[cache]
backend = "memory"
[[services]]
name = "bench"
upstream = "http://127.0.0.1:$UP"
prefix = "/svc"
  [[services.routes]]
  path = "/cached/{rest:path}"
  ttl = 3600
  [[services.routes]]
  path = "/uncached/{rest:path}"
  ttl = 0
TOML
cat > "$TMP/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"note":"' .. string.rep("x", 1013) .. '"}'
wrk.headers["Content-Type"] = "application/json"
LUA
# A key of its own for every request of every wrk run (the token after "--"): the
# measured run must not meet the entries its warm-up stored.
cat > "$TMP/unique.lua" <<'LUA'
counter = 0
init = function(args) token = args[1] or "" end
request = function()
  counter = counter + 1
  return wrk.format("GET", "/svc/cached/items?u=" .. token .. "-" .. counter)
end
LUA
SCRIPT=(); PATH_=/svc/uncached/items
case $ROW in
  serve_pass) ;;
  serve_post) SCRIPT=(-s "$TMP/post.lua") ;;
  serve_stored_miss) SCRIPT=(-s "$TMP/unique.lua"); PATH_=/svc/cached/items ;;
  serve_hit) PATH_=/svc/cached/items ;;
  floor_get) PATH_=/uncached/items ;;
  floor_post) SCRIPT=(-s "$TMP/post.lua"); PATH_=/uncached/items ;;
  *) echo "unknown row $ROW" >&2; exit 2 ;;
esac
if [[ $ROW == serve_* ]]; then
  COMMAND=(.venv/bin/python -m cachegw serve "$TMP/gateway.toml" --host 127.0.0.1 --port "$PORT")
else
  COMMAND=(.venv/bin/uvicorn --factory --app-dir tests/bench gateway_apps:floor --port "$PORT"
           --log-level warning --no-access-log --http httptools --loop uvloop)
fi
CACHEGW_BENCH_UPSTREAM=http://127.0.0.1:$UP valgrind --tool=callgrind --instr-atstart=no \
  --callgrind-out-file="$TMP/callgrind.out" "${COMMAND[@]}" >"$TMP/server.log" 2>&1 &
SERVER=$!; PIDS+=($SERVER)
for _ in $(seq 600); do
  curl -s -o /dev/null "http://127.0.0.1:$PORT$PATH_" && break
  sleep 1
done
wrk -t1 -c10 -d5s "${SCRIPT[@]}" "http://127.0.0.1:$PORT$PATH_" -- warm >/dev/null
callgrind_control -i on "$SERVER" >/dev/null 2>&1
wrk -t1 -c10 -d"${SECS}s" "${SCRIPT[@]}" "http://127.0.0.1:$PORT$PATH_" -- run >"$TMP/wrk.txt"
callgrind_control -i off "$SERVER" >/dev/null 2>&1
callgrind_control -d "$SERVER" >/dev/null 2>&1
sleep 2
REQUESTS=$(awk '/requests in/ {print $1}' "$TMP/wrk.txt")
INSTRUCTIONS=$(callgrind_annotate "$TMP"/callgrind.out.* | awk '/PROGRAM TOTALS/ && !n {gsub(",", "", $1); print $1; n = 1}')
if [[ -n ${CALLGRIND_KEEP:-} ]]; then cp "$TMP"/callgrind.out.* "$CALLGRIND_KEEP"; fi
echo "$ROW: $REQUESTS requests, $((INSTRUCTIONS / REQUESTS)) instructions per request"
