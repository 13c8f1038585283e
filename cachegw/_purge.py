"""Purging: take entries back before they expire, by tag, path, service or all.

Every entry carries *scopes* and the time its fetch started; a purge records, per scope,
the time it happened, and an entry is purged when one of its scopes was purged after its
fetch started (`cachegw._purge_local`: the record, its verdicts and the `Purges`
interface). So a purge is one write whatever the number of entries it covers — O(1) for a
service with 100,000 entries — and reads compare a few numbers.

A *hard* purge makes entries absent; a *soft* purge makes them stale, so they can still
be served under ``stale-while-revalidate`` / ``stale-if-error`` while one request
refreshes them (Fastly's soft purge, Cloudflare's "mark stale").

With the memory backend the purge record lives in the process. With Redis it lives in
Redis, in one hash slot (cluster-safe): a hash of scope times, an epoch counter and a
sorted-set log of recent purges. A process serving requests reads the epoch when its
last read is older than ``interval`` (100 ms) and applies the new log entries, so a
purge is seen everywhere within that bound; the admin endpoint answers only after it
has passed. Reading on the request path (one small GET per interval, not per request)
needs no background task, so `@cached` apps, which have no lifecycle hooks, work too.

Invalidations (an unsafe request, its ``Location`` / ``Content-Location``) are hard
purges of a path scope too: one mechanism, ordered against fetch start, so an answer
whose fetch started before an invalidation is never served as fresh after it (issue 11).
They are frequent, so each record carries the time after which it can match nothing —
``keep`` seconds, the longest an entry of the route lives plus `STORE_WINDOW` — and is
forgotten then: the record holds the paths written during one entry lifetime, not every
path ever written.

No acknowledged write is undone by Redis (issue 23). A process that cannot record an
invalidation keeps it (applied to its own copy at once) in a bounded *pending* list and
replays it, with its original time, until Redis takes it: once at once, then every
``interval``. A full reload of the record keeps the pending ones. And a Redis that is not
the server the record was last written on (restarted, with or without its data, or a
replica promoted by a failover, which may lack the latest records) is *fenced*: the first
process to poll it records a hard purge of ``*`` as of the server's start (a restart) or
of that moment (a promoted replica), so no entry fetched before is served by anyone. Its
identity is the server's ``run_id``, kept in the record's ``life`` key. While a process
cannot read the record, it drops its in-process copies of Redis entries
(`on_unreachable`): it serves nothing it cannot check.

Times are wall-clock seconds of the purging host: hosts are assumed to
be NTP-synchronised (a skew of *s* seconds lets a response fetched within *s* of a
purge survive it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from cachegw._backends import OP_TIMEOUT, CacheBackend

# Re-exported: scopes, verdicts, the record and purges within one process.
from cachegw._purge_local import (
    RECORD_TTL,
    STORE_WINDOW,
    LocalPurges,
    Purges,
    PurgeState,
    Verdict,
    scopes_for,
)
from cachegw._store import Breaker, read_time_left

__all__ = [
    "MAX_PENDING",
    "RECORD_TTL",
    "STORE_WINDOW",
    "LocalPurges",
    "PurgeState",
    "Purges",
    "RedisPurges",
    "Verdict",
    "purges_for",
    "scopes_for",
]

logger = logging.getLogger("cachegw")

#: Purges kept in the log for processes catching up; a process further behind reloads.
LOG_LENGTH = 10_000
#: Most scopes a process keeps waiting to be recorded in Redis; past it they collapse into
#: one hard purge of everything up to the latest of them (safe, and bounded).
MAX_PENDING = 10_000


def purges_for(backend: CacheBackend, prefix: str) -> Purges:
    """Purges shared through Redis when ``backend`` is shared, else per process (the
    gateway relays them between workers: see `_relay`)."""
    client = backend.shared_client
    return LocalPurges() if client is None else RedisPurges(client, prefix)


#: A purge waiting to be recorded: mode, time, end, scopes.
_Record = tuple[str, float, float, list[str]]


class RedisPurges(Purges):
    """Purges recorded in Redis and followed by every process sharing it."""

    propagation = 0.1

    def __init__(
        self,
        client: Any,
        prefix: str,
        *,
        interval: float = 0.1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock)
        self.client = client
        self.interval = interval
        self.propagation = interval * 2  # one poll period, plus the poll itself
        slot = "{" + prefix + ":purge}"  # one hash slot: the scripts touch all five
        self.keys = (
            f"{slot}:times",
            f"{slot}:epoch",
            f"{slot}:log",
            f"{slot}:ends",
            f"{slot}:life",
        )
        self.epoch = -1  # nothing applied yet: the first poll loads everything
        self.op_timeout = OP_TIMEOUT
        self._fresh_until = 0.0  # monotonic time until which the record is recent enough
        self._poll: asyncio.Task[None] | None = None
        self._script = client.register_script(_SCRIPT)
        self._poll_script = client.register_script(_POLL)
        #: The store's circuit breaker: while it is open, the record is not read.
        self.breaker: Breaker | None = None
        #: On a cluster, the breaker of the node a key lives on (the store's, per node).
        self.breaker_for: Callable[[str], Breaker] | None = None
        #: Whether the last poll failed or was skipped (Redis known to be sick).
        self.failing = False
        #: Called when this process cannot read the record: what it copied from Redis can
        #: no longer be checked against it (the engine drops its in-process copies).
        self.on_unreachable: Callable[[], None] | None = None
        #: Purges not yet recorded in Redis (applied here already), oldest first.
        self.pending: list[_Record] = []
        self._pending_scopes = 0
        self._replay: asyncio.Task[None] | None = None
        #: How many times this process found a new Redis life and fenced it.
        self.fences = 0
        #: The run_id of the server the record was last read from.
        self.server: bytes | None = None
        # "1" while the poll may ask the server for its identity (INFO), "0" once refused.
        self._check_life = "1"

    async def purge(
        self, scopes: Iterable[str], *, soft: bool = False, keep: float = RECORD_TTL
    ) -> float:
        at = self.clock()
        names = list(scopes)
        mode = "soft" if soft else "hard"
        until = at + min(keep, RECORD_TTL)
        # Applied here first: this process sees it at once, even if Redis fails.
        for scope in names:
            self.state.apply(scope, at, soft, until)
        # Pending until Redis has it: if the call fails, times out or is cancelled, the
        # purge is replayed until it is recorded (a write is never undone by an outage).
        record: _Record = (mode, at, until, names)
        self._hold(record)
        try:
            await self._record(record)
        except BaseException:
            self._start_replay()
            raise
        self._release(record)
        return at

    async def _record(self, record: _Record) -> None:
        mode, at, until, names = record
        await self._script(
            keys=list(self.keys),
            args=[mode, repr(at), RECORD_TTL, LOG_LENGTH, repr(until), *names],
        )

    def _hold(self, record: _Record) -> None:
        if self._pending_scopes + len(record[3]) > MAX_PENDING:
            # Too many to keep one by one: one hard purge of everything up to the latest.
            everything = [record, *self.pending]
            at = max(r[1] for r in everything)
            until = max(r[2] for r in everything)
            self.pending = [("hard", at, until, ["*"])]
            self._pending_scopes = 1
            logger.warning(
                "cachegw: more than %d invalidations could not be recorded in Redis; "
                "they will be recorded as one purge of everything",
                MAX_PENDING,
            )
            return
        self.pending.append(record)
        self._pending_scopes += len(record[3])

    def _release(self, record: _Record) -> None:
        for i, held in enumerate(self.pending):
            if held is record:
                del self.pending[i]
                self._pending_scopes -= len(record[3])
                return

    def _start_replay(self) -> None:
        if self.pending and (self._replay is None or self._replay.done()):
            self._replay = asyncio.get_running_loop().create_task(self._replay_pending())

    async def _replay_pending(self) -> None:
        """Record the pending purges, oldest first, until Redis takes them all."""
        while self.pending:
            record = self.pending[0]
            try:
                async with asyncio.timeout(self.op_timeout):
                    await self._record(record)
            except Exception as exc:
                logger.debug("cachegw: replaying a purge failed: %s", exc)
                await asyncio.sleep(self.interval)
                continue
            self._release(record)
        logger.info("cachegw: invalidations made while Redis was unreachable are recorded")

    async def aclose(self, grace: float = 5.0) -> None:
        task, self._replay = self._replay, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            task.cancel()
        if self.pending:
            logger.warning(
                "cachegw: %d invalidation(s) could not be recorded in Redis before shutdown",
                len(self.pending),
            )

    async def poll(self) -> None:
        """Apply purges made since the last poll (all of them, the first time); fence a
        Redis that is not the one the record was last written on."""
        now = self.clock()
        raw, fenced, server, *refused = await self._poll_script(
            keys=list(self.keys),
            args=[repr(now), RECORD_TTL, LOG_LENGTH, repr(now + RECORD_TTL), self._check_life],
        )
        epoch = int(raw)
        if refused:
            self._check_life = "0"
            logger.warning(
                "cachegw: Redis refuses INFO to this user (an ACL): a restarted or failed-over "
                "Redis cannot be recognised, so entries stored before it are not fenced; "
                "grant +info to fence them"
            )
        if not server:
            server = self.server  # not checked: as before
        known = self.server
        same_server, self.server = server == known, server
        if known is not None and not same_server:
            # Another server (a failover, a restart): its epochs are not the old one's,
            # even when the numbers meet. Load its whole record (with its fence).
            self.epoch = -1
        if fenced:
            self.fences += 1
            logger.warning(
                "cachegw: Redis is a new server (restarted or failed over): entries "
                "fetched before %s are no longer served",
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(fenced))),
            )
        if same_server and 0 <= epoch < self.epoch:
            # The record went back (flushed, evicted) on the same server: what it lost is
            # unknown, so everything fetched before now is out.
            logger.warning("cachegw: the purge record in Redis went back; fencing")
            self.fences += 1
            await self.purge(["*"])
            raw, *_ = await self._poll_script(
                keys=list(self.keys),
                args=[repr(now), RECORD_TTL, LOG_LENGTH, repr(now + RECORD_TTL), "0"],
            )
            epoch = int(raw)
            self.epoch = -1  # reload it all
        if epoch == self.epoch:
            return
        await self._catch_up(epoch)

    async def _catch_up(self, epoch: int) -> None:
        """Apply the record's changes up to ``epoch``: those logged since the last poll,
        or, the first time or when too far behind for the log, the whole record."""
        log_key, ends_key, times_key = self.keys[2], self.keys[3], self.keys[0]
        entries: list[tuple[bytes, float]] = []
        if self.epoch >= 0:
            entries = await self.client.zrangebyscore(
                log_key, self.epoch + 1, "+inf", withscores=True
            )
        complete = bool(entries) and int(entries[0][1]) <= self.epoch + 1
        if self.epoch < 0 or not complete:
            # First poll, or too far behind for the log: load the whole record.
            state = PurgeState()
            ends = dict(await self.client.zrange(ends_key, 0, -1, withscores=True))
            for member, at in await self.client.zrange(times_key, 0, -1, withscores=True):
                mode, _, scope = member.decode().partition("|")
                state.apply(scope, float(at), mode == "soft", ends.get(member))
            # What this process purged and Redis does not have yet stays applied here.
            for mode, at, until, names in self.pending:
                for scope in names:
                    state.apply(scope, at, mode == "soft", until)
            self.state = state
        else:
            for member, _ in entries:
                mode, at_text, until_text, scope = member.decode().split("|", 3)
                self.state.apply(scope, float(at_text), mode == "soft", float(until_text))
        self.epoch = epoch

    def due(self) -> bool:
        return time.monotonic() >= self._fresh_until

    async def refresh(self) -> None:
        # One poll at a time, and every request that finds the record too old waits for
        # it: a request never goes on with a record older than `interval` (the
        # visibility window), even when it arrives while another request polls.
        left = read_time_left(self.op_timeout)
        if left <= 0:
            return  # the request's read budget is spent: as after a failed poll
        poll = self._poll
        if poll is None or poll.done():
            poll = self._poll = asyncio.get_running_loop().create_task(self._refresh())
        # Waited for within the request's read budget (issue 12); past it the request
        # goes on as after a failed poll, and the poll goes on for the next ones.
        # asyncio.wait, not wait_for: on Python 3.11 wait_for swallows a cancellation
        # that arrives as the poll ends (a request whose client left would go on).
        # A poll still under way is not a failure (a loaded machine): copies are dropped
        # when it fails, at most `op_timeout` later.
        await asyncio.wait({poll}, timeout=left)

    def _unreachable(self) -> None:
        if self.on_unreachable is not None:
            self.on_unreachable()

    @property
    def trusted(self) -> bool:
        """Whether the record can be read (its last poll did not fail, nor was skipped for
        an open circuit): on a cluster, entries on live nodes are not served while the
        node holding the record is unreachable."""
        return not self.failing

    async def _follow_master(self) -> None:
        """Behind Sentinel: ask the sentinels which server is the master, and drop every
        connection (idle or in use) to one that is not any more. redis-py asks only when
        it opens a connection, so pooled ones would keep writing to a demoted master while
        it still accepts writes (during a failover, until the sentinels reconfigure it):
        invalidations recorded there would be lost."""
        pool = getattr(self.client, "connection_pool", None)
        manager = getattr(pool, "sentinel_manager", None)
        if pool is None or manager is None:
            return
        try:
            address = await manager.discover_master(pool.service_name)
        except Exception as exc:  # sentinels unreachable: keep the connections we have
            logger.debug("cachegw: asking the sentinels for the master failed: %s", exc)
            return
        if pool.master_address is not None and pool.master_address != address:
            logger.warning("cachegw: Sentinel names a new master, %s:%s", *address)
            pool.master_address = address
            await pool.disconnect(inuse_connections=True)
        elif pool.master_address is None:
            pool.master_address = address

    def _breaker(self) -> Breaker | None:
        if self.breaker_for is not None:
            return self.breaker_for(self.keys[0])
        return self.breaker

    async def _refresh(self) -> None:
        started = time.monotonic()
        if self.pending:
            self._start_replay()  # e.g. after a restart of the loop's work
        breaker = self._breaker()
        if breaker is not None and not breaker.allow():
            # Redis is known to be sick: keep the last known record, and ask again once
            # per interval, not per request (entries cannot be read from Redis either);
            # once per cooldown, this poll is the breaker's probe.
            self._unreachable()
            self.failing = True
            self._fresh_until = started + self.interval
            return
        try:
            async with asyncio.timeout(self.op_timeout):
                await self._follow_master()
                await self.poll()
        except Exception as exc:
            # Not fresh: the next request polls again (one poll at a time) rather than
            # serve with a record that may miss an invalidation.
            logger.debug("cachegw: reading purges failed: %s", exc)
            self._unreachable()
            self.failing = True
            if breaker is not None:
                breaker.failure()  # a stalled Redis shows here first, every 100 ms
        else:
            self._fresh_until = started + self.interval
            self.failing = False
            if breaker is not None and breaker.open:
                breaker.success()


# KEYS: times (sorted set "mode|scope" -> time), epoch counter, log (sorted set by epoch),
#       ends (sorted set "mode|scope" -> time after which the record can match nothing),
#       life (the run_id of the server the record was last fenced on).
# Records past their end are dropped on the way (a bounded number per call): no entry they
# could match is left, so the record holds the scopes purged during one entry lifetime.
_RECORD = """
local function record(mode, at, ttl, loglen, ends_at, scopes, first)
  local epoch = redis.call('INCR', KEYS[2])
  local when = tonumber(at)
  for i = first, #scopes do
    local member = mode .. '|' .. scopes[i]
    local old = tonumber(redis.call('ZSCORE', KEYS[1], member) or '0')
    if when > old then
      redis.call('ZADD', KEYS[1], at, member)
    end
    redis.call('ZADD', KEYS[4], 'GT', ends_at, member)
    redis.call('ZADD', KEYS[3], epoch, mode .. '|' .. at .. '|' .. ends_at .. '|' .. scopes[i])
  end
  local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. at, 'LIMIT', 0, 1000)
  if #gone > 0 then
    redis.call('ZREM', KEYS[1], unpack(gone))
    redis.call('ZREM', KEYS[4], unpack(gone))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (when - ttl))
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -loglen - 1)
  for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
  return epoch
end
"""

# ARGV: mode ("hard"/"soft"), time, record ttl, log length, end, scopes...
_SCRIPT = (
    _RECORD
    + """
return record(ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV, 6)
"""
)

# ARGV: time, record ttl, log length, end, "1" to check the server's identity (INFO).
# Returns {epoch, fence time or false, run_id[, 1 if INFO was refused]}.
# A primary whose run_id is not the one in `life` is a new server (restarted, or a replica
# promoted by a failover): its data may predate writes nobody could record, or lack the
# latest records, so a hard purge of everything is recorded at once. Its time: when the
# server started (from its uptime, rounded so it is not earlier) if it was never a replica
# since: everything it holds was fetched before that or after every write made while it
# was down; else now (a promoted replica's data is as old as its last sync). A read-only
# replica is left alone (it cannot be written, nor can entries be stored in it).
_POLL = (
    _RECORD
    + """
local epoch = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[5] ~= '1' then return {epoch, false, ''} end
local info = redis.pcall('INFO', 'server')
if type(info) == 'table' then return {epoch, false, '', 1} end  -- refused (an ACL)
local id = string.match(info, 'run_id:(%w+)') or '?'
if redis.call('GET', KEYS[5]) == id then return {epoch, false, id} end
local repl = redis.call('INFO', 'replication')
if not string.find(repl, 'role:master', 1, true) then return {epoch, false, id} end
local at = tonumber(ARGV[1])
if (string.match(repl, 'second_repl_offset:(%-?%d+)') or '-1') == '-1' then
  -- uptime_in_seconds counts whole seconds between whole-second clock readings: now minus
  -- it can be up to 1 s before the start, so 1 s is added (never later than now).
  local since = at - tonumber(string.match(info, 'uptime_in_seconds:(%d+)') or '0') + 1
  if since < at then at = since end
end
at = string.format('%.6f', at)
epoch = record('hard', at, tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], {'*'}, 1)
redis.call('SET', KEYS[5], id, 'EX', ARGV[2])
return {epoch, at, id}
"""
)
