-- roomcast: one node's member count for a room, and the room's count across live nodes
-- (see src/broker_redis/mod.rs).
--
-- KEYS[1] the room's presence hash: node id -> "COUNT:EXPIRES_MS", plus "_total"
-- ARGV[1] node id   ARGV[2] this node's members   ARGV[3] entry lifetime (ms)
-- ARGV[4] channel   ARGV[5] PUBLISH or SPUBLISH
-- ARGV[6] message   ARGV[7] joined names (JSON array)   ARGV[8] left names (JSON array)
--
-- A node that stops refreshing its entry (it died) drops out of the total when the entry
-- expires. Publishes "P\nTOTAL\nMESSAGE\nJOINED\nLEFT" when names changed or the total did.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (now + ttl))
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local total = 0
local last = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local field, value = entries[i], entries[i + 1]
  if field == '_total' then
    last = tonumber(value) or 0
  else
    local count, expires = string.match(value, '^(%d+):(%d+)$')
    if count and tonumber(expires) > now then
      total = total + tonumber(count)
    else
      redis.call('HDEL', KEYS[1], field)
    end
  end
end
redis.call('HSET', KEYS[1], '_total', total)
redis.call('PEXPIRE', KEYS[1], ttl * 4)
if ARGV[6] ~= '' or total ~= last then
  redis.call(ARGV[5], ARGV[4], 'P\n' .. total .. '\n' .. ARGV[6] .. '\n' .. ARGV[7] .. '\n' .. ARGV[8])
end
return total
