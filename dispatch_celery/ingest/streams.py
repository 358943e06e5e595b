"""Stream housekeeping the bridge runs now and then: group creation and the count of
entries the producer trimmed before our group read them (DESIGN.md invariant 8)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import redis

from dispatch_celery import constants as c
from dispatch_celery.errors import StreamError
from dispatch_celery.stats import Counter

log = logging.getLogger("dispatch_celery.ingest.bridge")

# KEYS: stream, stats hash, trim-cursor hash, per-stream trimmed hash.
# ARGV: group, cursor field (one per stream and group), counter name, stream key
# (and, for _READ, consumer and count).
# count_trimmed() returns code, detail: code >= 0 is the number of newly counted
# trimmed-unread entries, -1 when Redis cannot tell (before 7.0: no entries-added), -2 when
# the group is unknown.
# When the group's last-delivered id is older than the stream's first entry, the entries
# between them were trimmed unread: entries-added - entries-read - length. Two Redis
# behaviours (measured): from 7.2 (and Valkey) a read past such a gap corrects the group's
# entries-read, so the formula gives that gap alone and the gap must be counted *before*
# it is read past (the bridge reads through _READ while it is behind: check and read in
# one atomic call); the count already reported for the same cursor is kept, so a gap is
# counted once even when several bridges check it. Redis 7.0 leaves entries-read short by
# every gap read past, so the formula is cumulative (also once the group has caught up:
# entries-added - entries-read): the total counted so far is kept instead. (Before several
# streams the cursor field was the group alone; a 7.2 cursor there is still honoured.)
_COUNT = """
local function field(arr, name)
  for i = 1, #arr, 2 do if arr[i] == name then return arr[i + 1] end end
  return nil
end
local function older(a, b)
  local ams, aseq = string.match(a, '(%d+)-(%d+)')
  local bms, bseq = string.match(b, '(%d+)-(%d+)')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
local function count_trimmed()
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0, 'no stream' end
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  local first = field(info, 'first-entry')
  if not first then return 0, 'empty' end
  local first_id = first[1]
  local length = tonumber(field(info, 'length'))
  local added = field(info, 'entries-added')
  local per_gap = (redis.REDIS_VERSION_NUM or 0) >= 0x070200
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    if field(g, 'name') == ARGV[1] then
      local last = field(g, 'last-delivered-id')
      if last == '0-0' then return 0, 'ok' end
      local read = field(g, 'entries-read')
      local missed
      if older(last, first_id) then
        if not added or not read then return -1, last end
        missed = tonumber(added) - tonumber(read) - length
      elseif not per_gap and added and read and last == field(info, 'last-generated-id') then
        missed = tonumber(added) - tonumber(read)
      else
        return 0, 'ok'
      end
      local counted = 0
      local prev = redis.call('HGET', KEYS[3], ARGV[2])
      if per_gap then
        prev = prev or redis.call('HGET', KEYS[3], ARGV[1])
        if prev then
          local cur, n = string.match(prev, '(.+)|(%d+)')
          if cur == last then counted = tonumber(n) end
        end
      elseif prev then
        local n = string.match(prev, '^total|(%d+)$')
        if n then counted = tonumber(n) end
      end
      local delta = missed - counted
      if delta > 0 then
        redis.call('HINCRBY', KEYS[2], ARGV[3], delta)
        redis.call('HINCRBY', KEYS[4], ARGV[4], delta)
        local mark = per_gap and (last .. '|' .. missed) or ('total|' .. missed)
        redis.call('HSET', KEYS[3], ARGV[2], mark)
        return delta, last
      end
      return 0, last
    end
  end
  return -2, 'no group'
end
"""
_CHECK = (
    _COUNT
    + """
local n, detail = count_trimmed()
return {n, detail}
"""
)
# ``read_counted`` runs this check and XREADGROUP '>' in one MULTI/EXEC: nothing can be
# trimmed between counting a gap and reading past it. (Not XREADGROUP inside the script:
# turning 500 entries into Lua values and back cost Redis ~8 us of CPU per event, measured
# with benchmarks/cost.py, 3.5x the read itself.)

# An entry's fields: as Redis sends them, ``[name, value, ...]`` (see ``raw_stream_client``),
# or as redis-py parses them by default (a dict); None for a pending entry the producer
# trimmed (Redis answers it with no fields).
Fields = list[bytes] | dict[bytes, bytes] | None
Reply = list[tuple[bytes, Fields]]


def _raw(response: Any, **options: Any) -> Any:
    return response


def raw_stream_client(client: redis.Redis) -> redis.Redis:
    """A client on ``client``'s connections whose XREADGROUP and XAUTOCLAIM replies are
    Redis's own nested lists: redis-py turns every entry's fields into a dict in Python,
    which cost the bridge ~15 % of its CPU (py-spy, ``benchmarks/drain.py --only bridge``)
    to build a dict it reads one key of. ``codec.entry_from_fields`` takes the list.
    Callbacks are per client instance: ``client`` itself is left as it was."""
    reader = redis.Redis(connection_pool=client.connection_pool)
    for command in ("XREADGROUP", "XAUTOCLAIM"):
        reader.set_response_callback(command, _raw)
    return reader


def per_stream(reply: Any) -> list[tuple[bytes, Reply]]:
    """XREADGROUP's reply as [(stream key, entries)]: a map over RESP3, pairs over RESP2."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(key, entries) for key, entries in reply]


@dataclass
class StreamInfo:
    length: int
    lag: int | None
    pending: int
    last_delivered: str


class StreamAdmin:
    def __init__(self, client: redis.Redis, stream: str, group: str, service: str) -> None:
        self.r = client
        self.reader = raw_stream_client(client)
        self.stream = stream
        self.group = group
        self.service = service
        self._check = client.register_script(_CHECK)
        self._warned_unknown = ""

    def ensure_group(self) -> None:
        """Create our group at 0 (MKSTREAM); refuse a key of the wrong type clearly."""
        kind = cast(bytes, self.r.type(self.stream)).decode()
        if kind not in ("stream", "none"):
            raise StreamError(
                f"Redis key {self.stream!r} holds a {kind}, not a stream. An old llm-proxy "
                "version may have left it; point DISPATCH_STREAM at the producer's stream "
                "or remove the key."
            )
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, self.stream)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise StreamError(f"cannot create group {self.group!r}: {exc}") from exc

    def _keys_args(self) -> tuple[list[str], list[str]]:
        keys = [
            self.stream,
            c.stats_key(self.service),
            c.trim_cursor_key(self.service),
            c.trimmed_streams_key(self.service),
        ]
        args = [
            self.group,
            f"{self.group}|{self.stream}",
            Counter.TRIMMED_UNREAD.value,
            self.stream,
        ]
        return keys, args

    def check_trimmed(self) -> int:
        """Count entries trimmed before our group read them; returns the new count."""
        keys, args = self._keys_args()
        code, detail = cast(list[int | bytes], self._check(keys=keys, args=args))
        return self._report(int(code), detail)

    def read_counted(self, consumer: str, count: int) -> Reply:
        """XREADGROUP ``>`` (no blocking) right after counting a trimmed gap, atomically:
        how a bridge reads while it is behind (see ``_COUNT``)."""
        keys, args = self._keys_args()
        pipe = self.reader.pipeline(transaction=True)
        self._check(keys=keys, args=args, client=pipe)
        pipe.xreadgroup(self.group, consumer, {self.stream: ">"}, count=count)
        (code, detail), reply = pipe.execute()
        self._report(int(code), detail)
        found = per_stream(reply)
        return found[0][1] if found else []

    def _report(self, n: int, detail: object) -> int:
        where = detail.decode() if isinstance(detail, bytes) else str(detail)
        if n > 0:
            log.warning(
                "%d entries of %s were trimmed by the producer before group %s read them "
                "(the group fell more than the stream's MAXLEN behind)",
                n,
                self.stream,
                self.group,
            )
        elif n == -1 and where != self._warned_unknown:
            self._warned_unknown = where
            log.warning(
                "entries of %s were trimmed before group %s read them; this Redis cannot "
                "count them (needs Redis >= 7)",
                self.stream,
                self.group,
            )
        return max(n, 0)
