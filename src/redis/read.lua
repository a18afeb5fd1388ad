-- roomcast: a node's snapshot of one room, for a join or to fill a gap (see src/broker_redis.rs).
--
-- KEYS[1] epoch   KEYS[2] seq   KEYS[3] history   KEYS[4] de-duplication
-- ARGV[1] epoch to start if the room has none   ARGV[2] key lifetime in seconds
-- ARGV[3] the room's epoch as the reading node saw it   ARGV[4] the last seq it saw
--
-- Returns {epoch, last seq, history entries oldest first}. A room whose keys are gone gets a
-- new epoch here, so every node agrees on it before the first publish. So does a room whose
-- seq is behind what the reading node saw in the same epoch (acknowledged messages lost in a
-- Redis Cluster failover: see publish.lua); it keeps its seq and history.
local epoch = redis.call('GET', KEYS[1])
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
if not epoch then
  epoch = ARGV[1]
  seq = 0
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  redis.call('SET', KEYS[1], epoch, 'EX', tonumber(ARGV[2]))
elseif epoch == ARGV[3] and seq < tonumber(ARGV[4]) then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch, 'EX', tonumber(ARGV[2]))
end
return {epoch, seq, redis.call('LRANGE', KEYS[3], 0, -1)}
