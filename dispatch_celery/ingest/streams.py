"""Stream housekeeping the bridge runs now and then: group creation and the count of
entries the producer trimmed before our group read them (DESIGN.md invariant 8)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

import redis

from dispatch_celery import constants as c
from dispatch_celery.errors import StreamError

log = logging.getLogger("dispatch_celery.ingest.bridge")

# KEYS: stream, stats hash, trim-cursor hash.  ARGV: group.
# Returns {code, detail}: code >= 0 is the number of newly counted trimmed-unread entries,
# -1 when Redis cannot tell (before 7.0: no entries-added), -2 when the group is unknown.
# Logic: when the group's last-delivered id is older than the stream's first entry, every
# entry between them was trimmed unread: entries-added - entries-read - length. The count
# already reported for the same cursor is kept in the stats hash, so a gap is counted once
# even when several bridges check it.
_TRIMMED = """
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
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 'no stream'} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local first = field(info, 'first-entry')
if not first then return {0, 'empty'} end
local first_id = first[1]
local length = tonumber(field(info, 'length'))
local added = field(info, 'entries-added')
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(g, 'name') == ARGV[1] then
    local last = field(g, 'last-delivered-id')
    if last == '0-0' or not older(last, first_id) then return {0, 'ok'} end
    local read = field(g, 'entries-read')
    if not added or not read then return {-1, last} end
    local missed = tonumber(added) - tonumber(read) - length
    local prev = redis.call('HGET', KEYS[3], ARGV[1])
    local counted = 0
    if prev then
      local cur, n = string.match(prev, '(.+)|(%d+)')
      if cur == last then counted = tonumber(n) end
    end
    local delta = missed - counted
    if delta > 0 then
      redis.call('HINCRBY', KEYS[2], 'trimmed_unread', delta)
      redis.call('HSET', KEYS[3], ARGV[1], last .. '|' .. missed)
      return {delta, last}
    end
    return {0, last}
  end
end
return {-2, 'no group'}
"""


@dataclass
class StreamInfo:
    length: int
    lag: int | None
    pending: int
    last_delivered: str


class StreamAdmin:
    def __init__(self, client: redis.Redis, stream: str, group: str, service: str) -> None:
        self.r = client
        self.stream = stream
        self.group = group
        self.service = service
        self._trimmed = client.register_script(_TRIMMED)
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

    def check_trimmed(self) -> int:
        """Count entries trimmed before our group read them; returns the new count."""
        code, detail = cast(
            list[int | bytes],
            self._trimmed(
                keys=[self.stream, c.stats_key(self.service), c.trim_cursor_key(self.service)],
                args=[self.group],
            ),
        )
        n = int(code)
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
