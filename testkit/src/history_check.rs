//! What a benchmark run decided, checked from its Parquet history with SQL:
//! exactness against the generator's independent expectation, and the
//! overshoot of every cut.
//!
//! Why from the history: it is what flowcap wrote, for every run mode
//! (embedded or Kafka), after the process is gone; the check needs nothing
//! from the engine and cannot share its bugs.
//!
//! **Overshoot** of a card cut (a `state_changes` row: card to `suspended`
//! from another state, caused by a record, for a card-level reason:
//! `over_quota`, `over_threshold`, `general_cap`; pool cuts have a pool's
//! limit and are left out) counts the card's records of that cycle, in
//! input order, that were accounted *before* the causing record although
//! the running total had already reached the cut's limit: records that
//! should have been cut and were not. The design goal is 0 (the crossing
//! record is the cut). The bytes above the limit that the crossing record
//! itself brings (`overshoot_bytes`) are reported beside it: they are
//! usage that happened before anyone could know, not a late decision.

use std::collections::HashMap;
use std::path::Path;

use datafusion::arrow::array::Array;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::prelude::SessionContext;
use flowcap_loadgen::Expected;
use flowcap_sql as sql;
use flowcap_storage::HistoryLocation;

/// The outcome of [`check_history`].
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HistoryCheck {
    /// (card, cycle) pairs compared (the union of expected and written).
    pub cards_cycles_checked: u64,
    /// Pairs whose written total differs from the expectation.
    pub mismatched: u64,
    /// The first mismatch, for the report.
    pub first_mismatch: Option<String>,
    /// Card-level cuts found.
    pub cuts: u64,
    /// Cuts whose causing record is not in `usage_records` (should be 0).
    pub cuts_without_cause: u64,
    /// Records accounted after their card had reached the limit and before
    /// the cut, over all cuts (goal 0).
    pub overshoot_records: u64,
    /// The most such records of one cut.
    pub max_overshoot_records: u64,
    /// Bytes above the limit at the cut (the crossing record's excess), sum.
    pub overshoot_bytes: u64,
    /// The same, the largest of one cut.
    pub max_overshoot_bytes: u64,
}

/// Errors of [`check_history`]: the query failed or its answer was not
/// what the SQL promises.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The SQL layer failed.
    #[error(transparent)]
    Sql(#[from] flowcap_sql::SqlError),
    /// An answer column did not parse.
    #[error("unexpected value in the check's answer: {0}")]
    Value(String),
    /// The runtime could not start.
    #[error("tokio runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Cuts whose overshoot is measured, and per cut the records that should
/// have been cut before it.
const OVERSHOOT_SQL: &str = "\
WITH cuts AS (
  SELECT iccid, CAST(cycle AS VARCHAR) AS cycle, cause_id, limit_bytes, overshoot_bytes
  FROM state_changes
  WHERE CAST(subject AS VARCHAR) = 'card' AND CAST(new_state AS VARCHAR) = 'suspended'
    AND CAST(old_state AS VARCHAR) <> 'suspended' AND CAST(cause AS VARCHAR) = 'record'
    AND reasons NOT LIKE '%pool%' AND limit_bytes IS NOT NULL),
recs AS (
  SELECT iccid, CAST(cycle AS VARCHAR) AS cycle, record_id, input_seq,
    SUM(bytes) OVER (PARTITION BY iccid, cycle ORDER BY input_seq
                     ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS running
  FROM usage_records
  WHERE counted AND iccid IN (SELECT iccid FROM cuts)),
caused AS (
  SELECT c.iccid, c.cycle, c.limit_bytes, c.overshoot_bytes, r.input_seq AS cause_seq
  FROM cuts c JOIN recs r
    ON r.iccid = c.iccid AND r.cycle = c.cycle AND r.record_id = c.cause_id),
per_cut AS (
  SELECT c.iccid, c.cycle, c.cause_seq, c.overshoot_bytes, COUNT(r.input_seq) AS early
  FROM caused c LEFT JOIN recs r
    ON r.iccid = c.iccid AND r.cycle = c.cycle
   AND r.input_seq < c.cause_seq AND r.running >= c.limit_bytes
  GROUP BY c.iccid, c.cycle, c.cause_seq, c.overshoot_bytes)
SELECT (SELECT COUNT(*) FROM cuts) AS cuts,
       COUNT(*) AS caused,
       COALESCE(SUM(early), 0) AS early,
       COALESCE(MAX(early), 0) AS max_early,
       COALESCE(SUM(overshoot_bytes), 0) AS over_bytes,
       COALESCE(MAX(overshoot_bytes), 0) AS max_over_bytes
FROM per_cut";

/// Checks the history at `history` (a local directory) against the
/// generator's `expected` outcome. A workload whose records were only
/// partly consumed shows up as mismatches, not as an error.
pub fn check_history(history: &Path, expected: &Expected) -> Result<HistoryCheck, CheckError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let location = HistoryLocation::Local(history.to_owned());
    rt.block_on(async {
        let ctx = sql::open(&location).await?;
        let totals = sql::query(
            &ctx,
            "SELECT iccid, CAST(cycle AS VARCHAR), bytes FROM card_cycle_usage",
        )
        .await?;
        let mut written: HashMap<(String, String), u64> = HashMap::new();
        for row in batch_rows(&totals) {
            let bytes = number(&row[2])?;
            written.insert((row[0].clone(), row[1].clone()), bytes);
        }
        let mut check = HistoryCheck::default();
        for e in expected.entries() {
            let key = (e.iccid.to_string(), e.cycle.to_string());
            let got = written.remove(&key).unwrap_or(0);
            check.cards_cycles_checked += 1;
            if got != e.bytes {
                check.mismatched += 1;
                check.first_mismatch.get_or_insert_with(|| {
                    format!(
                        "card {} cycle {}: written {got}, expected {}",
                        key.0, key.1, e.bytes
                    )
                });
            }
        }
        for ((iccid, cycle), got) in written {
            check.cards_cycles_checked += 1;
            if got != 0 {
                check.mismatched += 1;
                check.first_mismatch.get_or_insert_with(|| {
                    format!("card {iccid} cycle {cycle}: written {got}, expected nothing")
                });
            }
        }
        overshoot(&ctx, &mut check).await?;
        Ok(check)
    })
}

/// Every row of `batches` as display strings (NULL as the empty string).
pub fn batch_rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            out.push(
                b.columns()
                    .iter()
                    .map(|c| {
                        if c.is_null(r) {
                            String::new()
                        } else {
                            array_value_to_string(c, r).unwrap_or_default()
                        }
                    })
                    .collect(),
            );
        }
    }
    out
}

/// Fills the overshoot fields of `check` from the `state_changes` and
/// `usage_records` tables of `ctx`.
async fn overshoot(ctx: &SessionContext, check: &mut HistoryCheck) -> Result<(), CheckError> {
    let over = sql::query(ctx, OVERSHOOT_SQL).await?;
    let row = batch_rows(&over)
        .into_iter()
        .next()
        .ok_or_else(|| CheckError::Value("no overshoot row".into()))?;
    check.cuts = number(&row[0])?;
    check.cuts_without_cause = check.cuts.saturating_sub(number(&row[1])?);
    check.overshoot_records = number(&row[2])?;
    check.max_overshoot_records = number(&row[3])?;
    check.overshoot_bytes = number(&row[4])?;
    check.max_overshoot_bytes = number(&row[5])?;
    Ok(())
}

fn number(text: &str) -> Result<u64, CheckError> {
    text.parse()
        .map_err(|_| CheckError::Value(format!("{text:?} is not a count")))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{BooleanArray, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::datasource::MemTable;

    use super::*;

    fn table(columns: Vec<(&str, Arc<dyn Array>)>) -> Arc<MemTable> {
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        let batch = RecordBatch::try_new(
            schema.clone(),
            columns.into_iter().map(|(_, a)| a).collect(),
        )
        .unwrap();
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap())
    }

    fn text(v: &[&str]) -> Arc<dyn Array> {
        Arc::new(StringArray::from(v.to_vec()))
    }

    fn ints(v: &[i64]) -> Arc<dyn Array> {
        Arc::new(Int64Array::from(v.to_vec()))
    }

    /// Card `a` (limit 100) reaches 110 on its second record but is cut on
    /// its third: one record of overshoot. Card `b` is cut on its crossing
    /// record: none. Card `c`'s cut names a record that is not there. A
    /// pool cut is not looked at.
    #[test]
    fn counts_records_accounted_between_the_crossing_and_the_cut() {
        let ctx = SessionContext::new();
        let usage = table(vec![
            ("iccid", text(&["a", "a", "a", "b", "b", "b"])),
            ("cycle", text(&["2026-11"; 6])),
            ("record_id", text(&["a1", "a2", "a3", "b1", "b2", "b3"])),
            ("input_seq", ints(&[1, 2, 3, 4, 5, 6])),
            ("bytes", ints(&[60, 50, 10, 60, 50, 10])),
            ("counted", Arc::new(BooleanArray::from(vec![true; 6]))),
        ]);
        let cuts = table(vec![
            ("subject", text(&["card", "card", "card", "pool"])),
            ("iccid", text(&["a", "b", "c", "a"])),
            ("cycle", text(&["2026-11"; 4])),
            (
                "old_state",
                text(&["active", "active", "active", "available"]),
            ),
            (
                "new_state",
                text(&["suspended", "suspended", "suspended", "exhausted"]),
            ),
            ("cause", text(&["record"; 4])),
            (
                "reasons",
                text(&["over_quota", "general_cap", "over_quota", ""]),
            ),
            ("cause_id", text(&["a3", "b2", "c9", "a1"])),
            ("limit_bytes", ints(&[100, 100, 100, 1])),
            ("overshoot_bytes", ints(&[20, 10, 5, 59])),
        ]);
        ctx.register_table("usage_records", usage).unwrap();
        ctx.register_table("state_changes", cuts).unwrap();
        let mut check = HistoryCheck::default();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(overshoot(&ctx, &mut check))
            .unwrap();
        assert_eq!(check.cuts, 3, "{check:?}");
        assert_eq!(check.cuts_without_cause, 1, "{check:?}");
        assert_eq!(check.overshoot_records, 1, "{check:?}");
        assert_eq!(check.max_overshoot_records, 1, "{check:?}");
        assert_eq!(check.overshoot_bytes, 30, "{check:?}");
        assert_eq!(check.max_overshoot_bytes, 20, "{check:?}");
    }
}
