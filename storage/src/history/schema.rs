//! The Arrow schemas of the history tables and the rows that fill them.
//!
//! Types are chosen for any Parquet reader (DuckDB, pyarrow, Spark): signed
//! 64-bit integers for bytes and positions (Spark has no unsigned types),
//! millisecond timestamps with the `UTC` time zone (Parquet's
//! "adjusted to UTC"), dictionary-encoded strings for low-cardinality
//! columns (carrier, state, codes). The partition column (`date` or
//! `cycle`) is not stored in the files: it is the Hive directory name.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Int32Builder, Int64Builder,
    RecordBatch, StringBuilder, StringDictionaryBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use flowcap_engine::command::MAX_ATTRIBUTE_NAMES;

/// The time zone every timestamp column carries.
pub const TIME_ZONE: &str = "UTC";

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some(TIME_ZONE.into()))
}

fn dict() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

fn field(name: &str, data_type: DataType, nullable: bool) -> Field {
    Field::new(name, data_type, nullable)
}

/// How a table is partitioned on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioning {
    /// `date=YYYY-MM-DD` (UTC+8 calendar day, the billing time zone).
    Date,
    /// `cycle=YYYY-MM` (the billing cycle).
    Cycle,
}

impl Partitioning {
    /// The partition column's name.
    pub fn column(self) -> &'static str {
        match self {
            Partitioning::Date => "date",
            Partitioning::Cycle => "cycle",
        }
    }
}

/// One history table: its name, file schema and partitioning.
#[derive(Debug, Clone)]
pub struct TableDef {
    /// Directory name and SQL table name.
    pub name: &'static str,
    /// What a row is, for `--help` and the docs.
    pub about: &'static str,
    /// Partition column.
    pub partitioning: Partitioning,
    /// Schema of the columns stored in the files.
    pub schema: SchemaRef,
}

/// Every table flowcap writes, in documentation order.
pub fn tables() -> Vec<TableDef> {
    vec![
        TableDef {
            name: USAGE_RECORDS,
            about: "every accepted, deduplicated usage record",
            partitioning: Partitioning::Date,
            schema: usage_records_schema(),
        },
        TableDef {
            name: QUARANTINE,
            about: "every rejected input, with reason, raw bytes and source position",
            partitioning: Partitioning::Date,
            schema: quarantine_schema(),
        },
        TableDef {
            name: CARD_DAILY_USAGE_PARTS,
            about: "per card and day: usage added in one flush (sum them; see the view card_daily_usage)",
            partitioning: Partitioning::Date,
            schema: card_daily_schema(),
        },
        TableDef {
            name: CARD_CYCLE_USAGE_PARTS,
            about: "per card and cycle: usage added in one flush (sum them; see the view card_cycle_usage)",
            partitioning: Partitioning::Cycle,
            schema: card_cycle_schema(),
        },
        TableDef {
            name: POOL_CYCLE_USAGE,
            about: "per pool and cycle: used, allowance, remaining and state at each snapshot; a closed cycle's total at its rollover, and its billed total (final) once the lateness has passed",
            partitioning: Partitioning::Cycle,
            schema: pool_cycle_schema(),
        },
        TableDef {
            name: STATE_CHANGES,
            about: "every card and pool state change (the action events), and every closed cycle's limit crossed within the lateness (old_state = new_state = late_crossing)",
            partitioning: Partitioning::Date,
            schema: state_changes_schema(),
        },
        TableDef {
            name: RULE_EXECUTIONS,
            about: "every automation rule firing and action as decided: rule, target, condition, observed value, cause, channel (delivery outcomes: outbox/*.done)",
            partitioning: Partitioning::Date,
            schema: rule_executions_schema(),
        },
        TableDef {
            name: RULE_DELIVERIES,
            about: "the outcome of every notification: execution, message (webhook-id), channel, attempts, outcome, last status and error (local day of the outcome)",
            partitioning: Partitioning::Date,
            schema: rule_deliveries_schema(),
        },
        TableDef {
            name: COMMAND_JOURNAL,
            about: "every command with its result",
            partitioning: Partitioning::Date,
            schema: command_journal_schema(),
        },
        TableDef {
            name: CARDS,
            about: "every card's attributes and state, the last snapshot of each day (attr_1..attr_6: the custom attributes, by the slot of their declared name)",
            partitioning: Partitioning::Date,
            schema: cards_schema(),
        },
    ]
}

/// Table names.
pub const USAGE_RECORDS: &str = "usage_records";
/// Rejected inputs.
pub const QUARANTINE: &str = "quarantine";
/// Daily usage deltas per card.
pub const CARD_DAILY_USAGE_PARTS: &str = "card_daily_usage_parts";
/// Cycle usage deltas per card.
pub const CARD_CYCLE_USAGE_PARTS: &str = "card_cycle_usage_parts";
/// Pool usage per cycle, as of each snapshot.
pub const POOL_CYCLE_USAGE: &str = "pool_cycle_usage";
/// Card and pool state changes.
pub const STATE_CHANGES: &str = "state_changes";
/// Rule firings.
pub const RULE_EXECUTIONS: &str = "rule_executions";
/// Notification outcomes.
pub const RULE_DELIVERIES: &str = "rule_deliveries";
/// Commands and results.
pub const COMMAND_JOURNAL: &str = "command_journal";
/// Card attributes and state.
pub const CARDS: &str = "cards";

fn usage_records_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        field("iccid", DataType::Utf8, false),
        field("record_id", DataType::Utf8, false),
        field("start_time", ts(), true),
        field("end_time", ts(), false),
        field("bytes_up", DataType::Int64, false),
        field("bytes_down", DataType::Int64, false),
        field("bytes", DataType::Int64, false),
        field("carrier", dict(), true),
        field("cycle", dict(), false),
        field("counted", DataType::Boolean, false),
        field("late", DataType::Boolean, false),
        field("input_seq", DataType::Int64, false),
    ]))
}

fn quarantine_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        field("input_seq", DataType::Int64, false),
        field("reason", dict(), false),
        field("message", DataType::Utf8, false),
        field("iccid", DataType::Utf8, true),
        field("record_id", DataType::Utf8, true),
        field("source_topic", dict(), true),
        field("source_partition", DataType::Int32, true),
        field("source_offset", DataType::Int64, true),
        field("source_time", ts(), true),
        field("raw", DataType::Binary, false),
    ]))
}

fn usage_sums(mut fields: Vec<Field>) -> Vec<Field> {
    fields.extend([
        field("records", DataType::Int64, false),
        field("bytes_up", DataType::Int64, false),
        field("bytes_down", DataType::Int64, false),
        field("bytes", DataType::Int64, false),
        field("late_records", DataType::Int64, false),
        field("late_bytes", DataType::Int64, false),
        field("through_seq", DataType::Int64, false),
    ]);
    fields
}

fn card_daily_schema() -> SchemaRef {
    Arc::new(Schema::new(usage_sums(vec![
        field("iccid", DataType::Utf8, false),
        field("day", DataType::Date32, false),
    ])))
}

fn card_cycle_schema() -> SchemaRef {
    Arc::new(Schema::new(usage_sums(vec![
        field("iccid", DataType::Utf8, false),
        field("carrier", dict(), true),
    ])))
}

fn pool_cycle_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        field("pool_id", DataType::Utf8, false),
        field("name", DataType::Utf8, false),
        field("kind", dict(), false),
        field("carrier", dict(), true),
        field("state", dict(), false),
        field("members", DataType::Int64, false),
        field("used_bytes", DataType::Int64, false),
        field("allowance_bytes", DataType::Int64, false),
        field("remaining_bytes", DataType::Int64, false),
        field("as_of", ts(), false),
        field("as_of_seq", DataType::Int64, false),
        // Null in files written before closed cycles had final rows.
        field("final", DataType::Boolean, true),
    ]))
}

fn state_changes_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        field("event_id", DataType::Utf8, false),
        field("subject", dict(), false),
        field("iccid", DataType::Utf8, true),
        field("pool_id", DataType::Utf8, true),
        field("old_state", dict(), false),
        field("new_state", dict(), false),
        field("reasons", DataType::Utf8, false),
        field("event_time", ts(), false),
        field("processed_at", ts(), true),
        field("cycle", dict(), false),
        field("usage_bytes", DataType::Int64, false),
        field("limit_bytes", DataType::Int64, true),
        field("overshoot_bytes", DataType::Int64, true),
        field("cause", dict(), false),
        field("cause_id", DataType::Utf8, false),
        field("cause_iccid", DataType::Utf8, true),
    ]))
}

fn rule_executions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        field("execution_id", DataType::Utf8, false),
        field("firing_id", DataType::Utf8, false),
        field("rule", DataType::Utf8, false),
        field("rule_type", DataType::Int32, false),
        field("iccid", DataType::Utf8, true),
        field("pool_id", DataType::Utf8, true),
        field("condition", DataType::Utf8, false),
        field("observed", DataType::Utf8, false),
        field("cause", dict(), false),
        field("cause_id", DataType::Utf8, false),
        field("cause_iccid", DataType::Utf8, true),
        field("channel", dict(), false),
        field("endpoint", DataType::Utf8, true),
        field("reminder", dict(), false),
        field("attempts", DataType::Int32, false),
        field("outcome", dict(), false),
        field("fired_at", ts(), false),
        field("cycle", dict(), false),
    ]))
}

fn rule_deliveries_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        field("execution_id", DataType::Utf8, false),
        field("message_id", DataType::Utf8, false),
        field("channel", dict(), false),
        field("destination", dict(), false),
        field("recipients", DataType::Utf8, true),
        field("rule", DataType::Utf8, true),
        field("alert", DataType::Boolean, false),
        field("attempts", DataType::Int32, false),
        field("outcome", dict(), false),
        field("status", DataType::Int32, true),
        field("error", DataType::Utf8, true),
        field("queued_at", ts(), false),
        field("done_at", ts(), false),
    ]))
}

fn command_journal_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        field("input_seq", DataType::Int64, false),
        field("command_id", DataType::Utf8, false),
        field("command_type", dict(), true),
        field("at", ts(), true),
        field("operator", DataType::Utf8, true),
        field("ok", DataType::Boolean, false),
        field("error_code", dict(), true),
        field("error_message", DataType::Utf8, true),
        field("failed_cards", DataType::Int64, false),
        field("repeat", DataType::Boolean, false),
        field("command", DataType::Utf8, false),
        field("result", DataType::Utf8, false),
    ]))
}

fn cards_schema() -> SchemaRef {
    let mut fields = vec![
        field("iccid", DataType::Utf8, false),
        field("carrier", dict(), false),
        field("plan", DataType::Utf8, true),
        field("state", dict(), false),
        field("reasons", DataType::Utf8, false),
        field("cycle", dict(), false),
        field("usage_bytes", DataType::Int64, false),
        field("threshold_mb", DataType::Int64, false),
        field("addon_mb", DataType::Int64, false),
        field("pool_id", DataType::Utf8, true),
        field("tags", DataType::Utf8, false),
        field("activated_at", ts(), true),
        field("expires_at", ts(), true),
        field("msisdn", DataType::Utf8, true),
        field("imsi", DataType::Utf8, true),
        field("imei", DataType::Utf8, true),
    ];
    fields.extend(
        (1..=MAX_ATTRIBUTE_NAMES).map(|slot| field(&attribute_column(slot), DataType::Utf8, true)),
    );
    fields.push(field("as_of", ts(), false));
    fields.push(field("as_of_seq", DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

/// The `cards` column of custom attribute slot `slot` (from 1): it holds
/// the value of the `slot`-th declared name.
pub fn attribute_column(slot: usize) -> String {
    format!("attr_{slot}")
}

/// Builds one column at a time for a schema, in field order.
pub(crate) struct Columns {
    schema: SchemaRef,
    arrays: Vec<ArrayRef>,
}

impl Columns {
    pub(crate) fn new(schema: SchemaRef) -> Columns {
        Columns {
            schema,
            arrays: Vec::new(),
        }
    }

    pub(crate) fn utf8<'a>(&mut self, values: impl Iterator<Item = Option<&'a str>>) {
        let mut b = StringBuilder::new();
        for v in values {
            b.append_option(v);
        }
        self.arrays.push(Arc::new(b.finish()));
    }

    pub(crate) fn dict<'a>(&mut self, values: impl Iterator<Item = Option<&'a str>>) {
        let mut b = StringDictionaryBuilder::<Int32Type>::new();
        for v in values {
            b.append_option(v);
        }
        self.arrays.push(Arc::new(b.finish()));
    }

    pub(crate) fn i64(&mut self, values: impl Iterator<Item = Option<i64>>) {
        let mut b = Int64Builder::new();
        for v in values {
            b.append_option(v);
        }
        self.arrays.push(Arc::new(b.finish()));
    }

    pub(crate) fn i32(&mut self, values: impl Iterator<Item = Option<i32>>) {
        let mut b = Int32Builder::new();
        for v in values {
            b.append_option(v);
        }
        self.arrays.push(Arc::new(b.finish()));
    }

    pub(crate) fn bool(&mut self, values: impl Iterator<Item = bool>) {
        let mut b = BooleanBuilder::new();
        for v in values {
            b.append_value(v);
        }
        self.arrays.push(Arc::new(b.finish()));
    }

    pub(crate) fn ts(&mut self, values: impl Iterator<Item = Option<i64>>) {
        let mut b = TimestampMillisecondBuilder::new().with_timezone(TIME_ZONE);
        for v in values {
            b.append_option(v);
        }
        self.arrays.push(Arc::new(b.finish()));
    }

    pub(crate) fn date(&mut self, values: impl Iterator<Item = i32>) {
        let mut b = Date32Builder::new();
        for v in values {
            b.append_value(v);
        }
        self.arrays.push(Arc::new(b.finish()));
    }

    pub(crate) fn binary<'a>(&mut self, values: impl Iterator<Item = &'a [u8]>) {
        let mut b = BinaryBuilder::new();
        for v in values {
            b.append_value(v);
        }
        self.arrays.push(Arc::new(b.finish()));
    }

    pub(crate) fn finish(self) -> Result<RecordBatch, ArrowError> {
        RecordBatch::try_new(self.schema, self.arrays)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_unique_and_schemas_have_no_partition_column() {
        let defs = tables();
        let mut names: Vec<_> = defs.iter().map(|t| t.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), defs.len());
        for t in &defs {
            assert!(
                t.schema.field_with_name(t.partitioning.column()).is_err(),
                "{} stores its partition column",
                t.name
            );
        }
    }
}
