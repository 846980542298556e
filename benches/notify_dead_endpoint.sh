#!/usr/bin/env bash
# Ingestion with a dead webhook endpoint vs. without one (issue #6): the
# same generated workload and the same two rules (type 2 "used >= 1 MB",
# type 4 "to suspended"), once with no action (firings recorded only) and
# once with a webhook action to an endpoint where nothing listens (every
# message is retried in the background and queued in the outbox). Runs
# alternate A/B to share the machine's noise; the ratio of inputs/s is the
# figure (docs/BENCHMARKS.md).
#
#   benches/notify_dead_endpoint.sh [FLOWCAP_BIN] [CARDS] [HOURS] [ROUNDS]
set -euo pipefail
bin=${1:-target/release/flowcap}
cards=${2:-20000}
hours=${3:-48}
rounds=${4:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" loadgen --out "$work/w" --cards "$cards" --hours "$hours" --seed 3 >&2
at=$(head -1 "$work/w/commands.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["at"])')
# Port 9 (discard) on loopback: nothing listens, connections are refused.
for variant in none dead; do
    cp "$work/w/commands.jsonl" "$work/commands-$variant.jsonl"
    if [ "$variant" = dead ]; then
        actions='[{"type":"webhook","endpoint":"dead"}]'
        echo "{\"id\":\"bench-hook\",\"at\":\"$at\",\"type\":\"upsert_webhook\",\"webhook\":{\"id\":\"dead\",\"url\":\"http://127.0.0.1:9/hook\"}}" >>"$work/commands-$variant.jsonl"
    else
        actions='[]'
    fi
    echo "{\"id\":\"bench-r1\",\"at\":\"$at\",\"type\":\"upsert_rule\",\"rule\":{\"id\":\"used1\",\"type\":2,\"condition\":{\"used_mb_gte\":1},\"actions\":$actions}}" >>"$work/commands-$variant.jsonl"
    echo "{\"id\":\"bench-r2\",\"at\":\"$at\",\"type\":\"upsert_rule\",\"rule\":{\"id\":\"cut\",\"type\":4,\"condition\":{\"to\":[\"suspended\"]},\"actions\":$actions}}" >>"$work/commands-$variant.jsonl"
done
printf '[notify]\ndrain_timeout_ms = 0\nmax_attempts = 8\n' >"$work/flowcap.toml"
echo "variant round inputs_per_sec rule_firings notifications_queued notifications_pending"
for round in $(seq 1 "$rounds"); do
    for variant in none dead; do
        out="$work/out-$variant"
        rm -rf "$out"
        "$bin" run -q --json --fresh --config "$work/flowcap.toml" --input "$work/w/usage.jsonl" \
            --commands "$work/commands-$variant.jsonl" --out "$out" >"$work/summary.json"
        python3 - "$variant" "$round" "$work/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[3]))["summary"]
n = s.get("notifications") or {}
print(sys.argv[1], sys.argv[2], round(s["inputs_per_sec"]), s["rule_firings"], n.get("queued", 0), n.get("pending", 0))
PY
    done
done
