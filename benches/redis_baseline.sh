#!/usr/bin/env bash
# The Redis + Lua baseline of the benchmark report (issue #7): Debian's
# redis-server on a free loopback port (no persistence), the per-card cap
# of benches/redis/card_cap.lua called once per record by redis-benchmark
# over CARDS random cards, each record 256 KiB (the
# generator's mean record size) against a CAP (default 2 MiB: the 8th
# record of a card cuts it, so the cut path runs too), at its best: requests
# pipelined (-P 64, 2 clients), and one request at a time from 50 clients
# (what a consumer that waits for each answer sees). No Kafka and no
# decoding on this side: the figure is an upper bound of the naive design.
#
#   benches/redis_baseline.sh [CARDS] [REQUESTS] [CAP_BYTES]
# Prints one JSON object: {"pipelined_per_sec": .., "unpipelined_per_sec": .., ...}.
# Exits 3 with a message when redis-server is not installed.
set -euo pipefail
cards=${1:-100000}
requests=${2:-2000000}
# 2 MiB: eight records cut a card, so the cut path runs too.
cap=${3:-2097152}
here=$(cd "$(dirname "$0")" && pwd)
for tool in redis-server redis-cli redis-benchmark; do
    if ! command -v "$tool" >/dev/null; then
        echo "redis baseline skipped: $tool not found (Debian: apt-get install redis-server)" >&2
        exit 3
    fi
done
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
work=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
    --daemonize no --logfile "$work/redis.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
done
sha=$(redis-cli -p "$port" script load "$(cat "$here/redis/card_cap.lua")")
rate() {
    # redis-benchmark --csv: "test","rps",... ; the second field is requests/s.
    redis-benchmark -p "$port" -r "$cards" "$@" --csv \
        evalsha "$sha" 1 "card:__rand_int__" 262144 "$cap" |
        tail -1 | cut -d, -f2 | tr -d '"'
}
pipelined=$(rate -n "$requests" -c 2 -P 64)
redis-cli -p "$port" flushall >/dev/null
redis-cli -p "$port" script load "$(cat "$here/redis/card_cap.lua")" >/dev/null
unpipelined=$(rate -n "$((requests / 4))" -c 50 -P 1)
# Check: every request of the second run was counted (the sum of the cards'
# usage is requests x 256 KiB), and cards were cut at the cap.
check=$(redis-cli -p "$port" eval "local used, cut = 0, 0 for _,k in ipairs(redis.call('KEYS','card:*')) do used = used + tonumber(redis.call('HGET',k,'used')) if redis.call('HGET',k,'state')=='suspended' then cut = cut + 1 end end return {tostring(used), cut}" 0 | paste -sd' ')
used=${check%% *}
suspended=${check##* }
if [ "$used" != "$((requests / 4 * 262144))" ]; then
    echo "redis baseline: counted $used bytes, expected $((requests / 4 * 262144))" >&2
    exit 1
fi
keys=$(redis-cli -p "$port" dbsize)
version=$(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')
printf '{"redis": "%s", "cards": %s, "requests": %s, "pipelined_per_sec": %s, "unpipelined_per_sec": %s, "cards_touched": %s, "cards_suspended": %s}\n' \
    "$version" "$cards" "$requests" "$pipelined" "$unpipelined" "$keys" "$suspended"
