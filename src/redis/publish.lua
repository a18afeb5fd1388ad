-- roomcast: one publish into one room, atomically (see src/broker_redis.rs).
--
-- KEYS[1] epoch   KEYS[2] seq   KEYS[3] history (list)   KEYS[4] de-duplication (hash)
-- All four carry the room's {hash tag}, so the script runs on Redis Cluster too.
-- ARGV[1] history limit     ARGV[2] epoch to start if the room has none
-- ARGV[3] message JSON up to its seq   ARGV[4] message JSON after its seq
-- ARGV[5] de-duplication key (session and requestId; empty: none)
-- ARGV[6] message id        ARGV[7] hash of the text (same requestId, other text: conflict)
-- ARGV[8] channel           ARGV[9] PUBLISH or SPUBLISH   ARGV[10] key lifetime in seconds
-- ARGV[11] the room's epoch as the publishing node saw it   ARGV[12] the last seq it saw
--
-- History entries are "seq\nJSON\nDEDUPE-KEY" (JSON never holds a raw newline); the channel
-- gets "EPOCH\nSEQ\nJSON". Returns {1, seq, epoch} for a new message, {2, seq, id, epoch}
-- for a repeat of the same requestId with the same text, {3} for the same requestId with
-- another text.
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  -- The room's keys are gone (first publish, restart without persistence, eviction, expiry):
  -- a new epoch, and seq starts again at 1.
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  redis.call('SET', KEYS[1], epoch, 'EX', tonumber(ARGV[10]))
elseif epoch == ARGV[11] and tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[12]) then
  -- A node saw seqs of this epoch that Redis no longer has: acknowledged messages were lost
  -- (Redis Cluster promoted a replica that had not received them). Going on would hand out
  -- those seqs again, to other messages. A new epoch instead: every node re-reads the room
  -- and tells its members (and resuming clients) that their history is incomplete.
  epoch = ARGV[2]
  redis.call('SET', KEYS[1], epoch, 'EX', tonumber(ARGV[10]))
end
local dedupe = ARGV[5]
if dedupe ~= '' then
  local seen = redis.call('HGET', KEYS[4], dedupe)
  if seen then
    local seq, id, text_hash = string.match(seen, '^(%d+)\n([^\n]*)\n(.*)$')
    if text_hash == ARGV[7] then
      return {2, tonumber(seq), id, epoch}
    end
    return {3}
  end
end
local seq = redis.call('INCR', KEYS[2])
local json = ARGV[3] .. seq .. ARGV[4]
local limit = tonumber(ARGV[1])
if limit > 0 then
  redis.call('RPUSH', KEYS[3], seq .. '\n' .. json .. '\n' .. dedupe)
  if dedupe ~= '' then
    redis.call('HSET', KEYS[4], dedupe, seq .. '\n' .. ARGV[6] .. '\n' .. ARGV[7])
  end
  while redis.call('LLEN', KEYS[3]) > limit do
    local old = redis.call('LPOP', KEYS[3])
    local old_dedupe = string.match(old, '^[^\n]*\n[^\n]*\n(.*)$')
    if old_dedupe and old_dedupe ~= '' then
      redis.call('HDEL', KEYS[4], old_dedupe)
    end
  end
end
local ttl = tonumber(ARGV[10])
for i = 1, 4 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
redis.call(ARGV[9], ARGV[8], epoch .. '\n' .. seq .. '\n' .. json)
return {1, seq, epoch}
