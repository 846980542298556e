#!/usr/bin/env bash
# The benchmark suite in one command (issue #7): every measurement of the
# report with its baseline measured in the same run, then one Markdown
# report with the plots.
#
#   benches/report.sh [--scenario quick|standard] [--out DIR] [--docs]
#
#   quick     small workloads, one repetition: to check the suite end to
#             end, not for figures.
#   standard  the sizes of docs/BENCHMARKS.md (hours on 2 cores: a year
#             of history is generated once, 10M cards are set up).
#
# Steps (each prints its progress on stderr; the broker is started by the
# report binaries, Tansu on a free loopback port):
#   1. kafka_report: raw rdkafka consume of the usage topic vs flowcap end
#      to end (throughput), exactness and overshoot from the first run's
#      history, latency produce -> action at 25/50/90 % of flowcap's rate
#      (hdrhistogram p50/p99/p999), the broker's own latency, and the time
#      back to consuming after kill -9, and the operator API under
#      ingestion (GET /cards/{iccid} latency at half flowcap's rate, the
#      backlog's drain rate with and without that load).
#   2. engine_report: resident memory per card, one process per card count.
#   3. benches/redis_baseline.sh: the naive Redis + Lua per-card cap
#      (skipped with a message when redis-server is not installed).
#   4. sql_report: the console queries in DataFusion vs DuckDB over a
#      generated history, and ingest with the history on vs off.
#   5. report.md in DIR: the headline ratios, then each step's tables and
#      plots.
#
# The report is not committed (target/ is ignored). With --docs the
# charts also replace docs/img's pictures of the same names, the ones
# docs/BENCHMARKS.md shows: one undated picture per chart.
set -euo pipefail
scenario=standard
out=target/bench-report
docs=no
while [ $# -gt 0 ]; do
    case $1 in
        --scenario) scenario=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --docs) docs=yes; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "report.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $scenario in
    quick)
        cards=20000 hours=10 repeats=1 latency_secs=10
        recovery_cards=100000 recovery_records=200000 recovery_backlog=50000
        memory_cards="1000000" redis_cards=20000 redis_requests=500000
        sql_cards=2000 sql_hours=720 cost_cards=5000 cost_hours=48 rounds=1
        api_cards=20000 api_per_card_hour=20 ;;
    standard)
        cards=100000 hours=20 repeats=3 latency_secs=20
        recovery_cards=1000000,10000000 recovery_records=1000000 recovery_backlog=300000
        memory_cards="1000000 10000000" redis_cards=100000 redis_requests=2000000
        sql_cards=20000 sql_hours=8760 cost_cards=20000 cost_hours=48 rounds=3
        api_cards=1000000 api_per_card_hour=2 ;;
    *) echo "report.sh: --scenario quick or standard, not $scenario" >&2; exit 2 ;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p "$out"
out=$(cd "$out" && pwd)
started=$(date +%s)
step() { echo "== [$1/5, $(( $(date +%s) - started )) s] $2" >&2; }

step 0 "release build (flowcap, report binaries)"
cargo build --release -p flowcap -p flowcap-benches >&2

step 1 "Kafka: throughput vs raw consume, exactness, overshoot, latency at 25/50/90 %, recovery, the API under ingestion"
./target/release/kafka_report \
    --phases throughput,latency,broker-latency,recovery,api \
    --cards "$cards" --hours "$hours" --repeats "$repeats" \
    --latency-fractions 0.25,0.5,0.9 --latency-secs "$latency_secs" \
    --recovery-cards "$recovery_cards" --recovery-records "$recovery_records" \
    --recovery-backlog "$recovery_backlog" --recovery-variants default,static \
    --api-cards "$api_cards" --api-per-card-hour "$api_per_card_hour" \
    --out "$out/kafka.jsonl" --plot "$out" >"$out/kafka.md"

step 2 "memory per card: $memory_cards"
rm -f "$out/engine.jsonl"
for n in $memory_cards; do
    ./target/release/engine_report --cards "$n" --out "$out/engine.jsonl" >"$out/engine-$n.md"
done
./target/release/engine_report --out "$out/engine.jsonl" --plot "$out/memory_per_card.png"

step 3 "Redis + Lua baseline"
if benches/redis_baseline.sh "$redis_cards" "$redis_requests" >"$out/redis.json" 2>"$out/redis.err"; then
    cat "$out/redis.json" >&2
else
    echo "Redis baseline skipped: $(cat "$out/redis.err")" >&2
    echo '{}' >"$out/redis.json"
fi

step 4 "SQL: DataFusion vs DuckDB, history cost"
./target/release/sql_report --data "$out/sql-history" --cards "$sql_cards" --hours "$sql_hours" \
    --cost-cards "$cost_cards" --cost-hours "$cost_hours" --cost-rounds "$rounds" \
    --report "$out/sql" >/dev/null

step 5 "report"
python3 - "$out" "$scenario" <<'PY'
import json, math, os, sys

out, scenario = sys.argv[1], sys.argv[2]
lines = [json.loads(l) for l in open(os.path.join(out, "kafka.jsonl")) if l.strip()]
def newest(phase, measure):
    for l in reversed(lines):
        if l.get("phase") == phase and l.get("measure") == measure:
            return l
    return {}
tp = newest("throughput", "summary")
check = newest("throughput", "check")
machine = newest("machine", "machine")
redis = json.load(open(os.path.join(out, "redis.json")))
sql = json.load(open(os.path.join(out, "sql", "results.json")))
engine = [json.loads(l) for l in open(os.path.join(out, "engine.jsonl")) if l.strip()]
lat = [l for l in lines if l.get("phase") == "latency" and l.get("measure") == "summary"]

def median(v):
    v = sorted(v)
    return 0 if not v else (v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2)

rows = []
fc = tp.get("flowcap_median", 0)
raw = tp.get("raw_median", 0)
rows.append(("flowcap end to end / raw rdkafka consume", f"{fc:,.0f} / {raw:,.0f} records/s = **{fc / raw:.2f}**" if raw else "-", ">= 0.8; >= 300k/s"))
rp = redis.get("pipelined_per_sec")
if rp:
    rows.append(("flowcap end to end / Redis + Lua (pipelined, no Kafka)", f"{fc:,.0f} / {float(rp):,.0f} = **{fc / float(rp):.2f}**", ">= 10"))
    rows.append(("flowcap end to end / Redis + Lua (one call at a time, 50 clients)", f"{fc:,.0f} / {float(redis['unpipelined_per_sec']):,.0f} = **{fc / float(redis['unpipelined_per_sec']):.2f}**", ">= 10"))
else:
    rows.append(("flowcap / Redis + Lua", "skipped: redis-server not installed", ">= 10"))
qs = sql.get("queries", {}).get("queries", [])
if qs:
    ratios = [median(q["datafusion_ms"]) / max(median(q["duckdb_ms"]), 1e-9) for q in qs]
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    worst = max(zip(ratios, [q["name"] for q in qs]))
    rows.append(("DataFusion / DuckDB, console queries (geometric mean; worst)", f"**{geo:.2f}**; {worst[0]:.2f} ({worst[1]})", "<= 1.0 each"))
    per_card = [median(q["datafusion_ms"]) for q in qs if q["per_card"]]
    rows.append(("per-card queries, slowest median", f"{max(per_card):.0f} ms", "< 100 ms"))
hc = sql.get("history_cost", [])
if hc:
    on = sum(r["with_history"] for r in hc) / len(hc)
    off = sum(r["without_history"] for r in hc) / len(hc)
    rows.append(("ingest, history on / off (embedded)", f"{on / off:.2f}", ">= 0.85"))
for l in sorted(lat, key=lambda l: l.get("rate_target", 0)):
    rows.append((f"latency produce -> action at {l.get('rate_target', 0):,.0f} records/s, p50 / p99 / p999",
                 f"{l.get('p50_ms', 0):.0f} / {l.get('p99_ms', 0):.0f} / {l.get('p999_ms', 0):.0f} ms", "p99 <= 10 ms at half load"))
if check:
    rows.append(("exactness: (card, cycle) totals differing from the expectation", f"{check['mismatched']} of {check['cards_cycles_checked']}", "0"))
    rows.append(("overshoot: records accounted past the limit before the cut", f"{check['overshoot_records']} over {check['cuts']} cuts", "0"))
for e in sorted(engine, key=lambda e: e.get("cards", 0)):
    # The plot's measure: the setup's RSS less the retained command results.
    per = (e["rss_delta"] - e["commands"] * e["per_command"]) / e["cards"] if e.get("cards") else None
    if per:
        rows.append((f"resident memory per card, {e['cards']:,} cards", f"{per:.0f} B", "<= 96 B"))
for l in lines:
    if l.get("phase") == "recovery" and l.get("measure") == "kill9" and l.get("to_consuming_secs") is not None:
        rows.append((f"kill -9 -> consuming again, {l['cards']:,} cards ({l['variant']}, {l['group']})",
                     f"{l['to_consuming_secs']:.1f} s (first record processed {l.get('to_first_output_secs') or 0:.1f} s)", "-"))

with open(os.path.join(out, "report.md"), "w") as f:
    f.write(f"# flowcap benchmark report ({scenario})\n\n")
    f.write(f"Machine: {machine.get('nproc', '?')} cores, {machine.get('cpu', '?')}, {machine.get('tansu', '?')}; "
            "broker, flowcap and the baselines share it.\n\n")
    f.write("| headline | measured | goal |\n| --- | --- | --- |\n")
    for r in rows:
        f.write(f"| {r[0]} | {r[1]} | {r[2]} |\n")
    f.write("\n![throughput](kafka_throughput.png) ![throughput over time](kafka_throughput_over_time.png) ![latency](kafka_latency_cdf.png) ![memory](memory_per_card.png)\n")
    f.write("\n## Kafka pipeline (kafka_report)\n")
    f.write(open(os.path.join(out, "kafka.md")).read())
    f.write("\n## Engine memory (engine_report)\n\n")
    for name in sorted(os.listdir(out)):
        if name.startswith("engine-") and name.endswith(".md"):
            f.write(open(os.path.join(out, name)).read() + "\n")
    f.write("\n## Redis + Lua baseline\n\n```json\n" + json.dumps(redis, indent=1) + "\n```\n\n")
    f.write(open(os.path.join(out, "sql", "report.md")).read().replace("](", "](sql/"))
print(os.path.join(out, "report.md"))
PY
if [ "$docs" = yes ]; then
    cp "$out"/*.png "$out"/sql/*.png docs/img/
    echo "charts copied to docs/img" >&2
fi
step 5 "done: $out/report.md"
