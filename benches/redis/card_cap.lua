-- The naive baseline of the benchmark report (issue #7): a per-card cap
-- kept in Redis, one script call per usage record.
--
-- KEYS[1]  the card's hash (fields: used, state)
-- ARGV[1]  the record's bytes (bytes_up + bytes_down)
-- ARGV[2]  the card's cap in bytes
--
-- Adds the bytes to the card's usage; the record that takes the usage to
-- the cap or past it suspends the card (returns 1, the cut); records of a
-- suspended card are still counted (returns 2); otherwise 0. No dedupe, no
-- pools, no cycles, no history: less work than flowcap does per record, so
-- the ratio against it errs in Redis's favour.
local bytes = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local used = redis.call('HINCRBY', KEYS[1], 'used', bytes)
if redis.call('HGET', KEYS[1], 'state') == 'suspended' then
  return 2
end
if used >= cap then
  redis.call('HSET', KEYS[1], 'state', 'suspended')
  return 1
end
return 0
