"""Runs SQL over a flowcap history directory with DuckDB.

Reads {"root": DIR, "queries": [SQL, ...]} on stdin; registers every table
directory under DIR as a view over its Parquet files (Hive partitions, the
partition column as text, as flowcap registers it) plus flowcap's views,
runs each query, and prints one JSON list of rows per query (a row is a
list of values: integers as integers, everything else as text).

With "reps": N in the request (the SQL benchmark, benches/src/bin/sql_report.rs)
it times instead: it prints {"open_ms": ..., "threads": ..., "results":
[{"rows": R, "first_ms": ..., "ms": [N timings]}]}, each timing the
execution of one query with all its rows fetched, in this process.
"""
import json
import os
import sys
import time

import duckdb

VIEWS = {
    "card_daily_usage": "SELECT iccid, day, date, SUM(records) AS records, SUM(bytes_up) AS bytes_up, "
    "SUM(bytes_down) AS bytes_down, SUM(bytes) AS bytes, SUM(late_records) AS late_records, "
    "SUM(late_bytes) AS late_bytes FROM card_daily_usage_parts GROUP BY iccid, day, date",
    "card_cycle_usage": "SELECT iccid, cycle, SUM(records) AS records, SUM(bytes_up) AS bytes_up, "
    "SUM(bytes_down) AS bytes_down, SUM(bytes) AS bytes, SUM(late_records) AS late_records, "
    "SUM(late_bytes) AS late_bytes FROM card_cycle_usage_parts GROUP BY iccid, cycle",
}


def value(v):
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return v
    if v is None:
        return None
    return str(v)


def main():
    request = json.load(sys.stdin)
    root = request["root"]
    started = time.perf_counter()
    con = duckdb.connect()
    for table in sorted(os.listdir(root)):
        path = os.path.join(root, table)
        if not os.path.isdir(path) or not os.listdir(path):
            continue
        part = os.listdir(path)[0].split("=")[0]
        con.execute(
            f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{path}/*/*.parquet', "
            f"hive_partitioning = true, hive_types = {{'{part}': VARCHAR}})"
        )
    for name, sql in VIEWS.items():
        con.execute(f"CREATE VIEW {name} AS {sql}")
    reps = request.get("reps")
    if reps is not None:
        json.dump(timed(con, request["queries"], reps, started), sys.stdout)
        return
    out = []
    for sql in request["queries"]:
        rows = con.execute(sql).fetchall()
        out.append([[value(v) for v in row] for row in rows])
    json.dump(out, sys.stdout)


def timed(con, queries, reps, started):
    open_ms = (time.perf_counter() - started) * 1000
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    results = []
    for sql in queries:
        times = []
        rows = 0
        for _ in range(reps + 1):
            t = time.perf_counter()
            rows = len(con.execute(sql).fetchall())
            times.append((time.perf_counter() - t) * 1000)
        results.append({"rows": rows, "first_ms": times[0], "ms": times[1:]})
    return {"open_ms": open_ms, "threads": threads, "results": results}


if __name__ == "__main__":
    main()
