-- roomcast: a node's snapshot of one room, for a join or to fill a gap (see src/broker_redis.rs).
--
-- KEYS[1] epoch   KEYS[2] seq   KEYS[3] history   KEYS[4] de-duplication
-- ARGV[1] epoch to start if the room has none   ARGV[2] key lifetime in seconds
--
-- Returns {epoch, last seq, history entries oldest first}. A room whose keys are gone gets a
-- new epoch here, so every node agrees on it before the first publish.
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  redis.call('SET', KEYS[1], epoch, 'EX', tonumber(ARGV[2]))
end
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
return {epoch, seq, redis.call('LRANGE', KEYS[3], 0, -1)}
