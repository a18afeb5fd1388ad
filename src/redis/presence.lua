-- roomcast: one node's member counts for one or more rooms, and each room's count across live
-- nodes (see src/broker_redis/mod.rs). One room when its members change; a batch of rooms held
-- by one Redis server when the node re-states its counts (on Redis Cluster the broker puts the
-- `allow-cross-slot-keys` flag in front of this body for that).
--
-- KEYS[1] the first room's presence hash (it routes the call on Redis Cluster, which requires
-- declared keys to share one slot; the other rooms' keys are in ARGV, on the same server).
-- ARGV[1] node id   ARGV[2] entry lifetime (ms)   ARGV[3] PUBLISH or SPUBLISH
-- Then six arguments per room from ARGV[4 + 6 * (i - 1)]: its presence hash (node id ->
-- "COUNT:EXPIRES_MS", plus "_total"), this node's members, the room's channel, the message,
-- joined names (JSON array), left names (JSON array).
--
-- A node that stops refreshing its entry (it died) drops out of the total when the entry
-- expires. Publishes "P\nTOTAL\nMESSAGE\nJOINED\nLEFT" when names changed or the total did.
-- Returns each room's total. Running a room twice changes nothing the second time (a batch a
-- moved slot stopped half-way is run again room by room).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node = ARGV[1]
local ttl = tonumber(ARGV[2])
local publish = ARGV[3]
local totals = {}
for at = 4, #ARGV, 6 do
  local key, members, channel, message = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  if tonumber(members) > 0 then
    redis.call('HSET', key, node, members .. ':' .. (now + ttl))
  else
    redis.call('HDEL', key, node)
  end
  local total = 0
  local last = 0
  local entries = redis.call('HGETALL', key)
  for j = 1, #entries, 2 do
    local field, value = entries[j], entries[j + 1]
    if field == '_total' then
      last = tonumber(value) or 0
    else
      local count, expires = string.match(value, '^(%d+):(%d+)$')
      if count and tonumber(expires) > now then
        total = total + tonumber(count)
      else
        redis.call('HDEL', key, field)
      end
    end
  end
  redis.call('HSET', key, '_total', total)
  redis.call('PEXPIRE', key, ttl * 4)
  if message ~= '' or total ~= last then
    redis.call(publish, channel,
      'P\n' .. total .. '\n' .. message .. '\n' .. ARGV[at + 4] .. '\n' .. ARGV[at + 5])
  end
  totals[#totals + 1] = total
end
return totals
