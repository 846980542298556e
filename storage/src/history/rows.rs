//! The history's rows: what the writer buffers per table, and the Arrow
//! record batches each table's rows become (one function per table, in
//! its schema's column order: `schema.rs`).

use super::*;
use flowcap_engine::command::MAX_ATTRIBUTE_NAMES;

#[derive(Debug, Clone)]
pub(super) struct StateChange {
    pub(super) event: ActionEvent,
}

#[derive(Debug, Clone)]
pub(super) struct JournalRow {
    pub(super) seq: u64,
    pub(super) command_id: String,
    pub(super) command_type: Option<String>,
    pub(super) at: Option<i64>,
    pub(super) operator: Option<String>,
    pub(super) ok: bool,
    pub(super) error_code: Option<String>,
    pub(super) error_message: Option<String>,
    pub(super) failed_cards: i64,
    pub(super) repeat: bool,
    pub(super) command: String,
    pub(super) result: String,
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct UsageSums {
    pub(super) records: i64,
    pub(super) bytes_up: i64,
    pub(super) bytes_down: i64,
    pub(super) late_records: i64,
    pub(super) late_bytes: i64,
    pub(super) through_seq: i64,
}

impl UsageSums {
    pub(super) fn merge(&mut self, o: &UsageSums) {
        self.records += o.records;
        self.bytes_up = self.bytes_up.saturating_add(o.bytes_up);
        self.bytes_down = self.bytes_down.saturating_add(o.bytes_down);
        self.late_records += o.late_records;
        self.late_bytes = self.late_bytes.saturating_add(o.late_bytes);
        self.through_seq = self.through_seq.max(o.through_seq);
    }

    pub(super) fn add(&mut self, a: &Accounted) {
        let up = to_i64(a.usage.bytes_up);
        let down = to_i64(a.usage.bytes_down);
        self.records += 1;
        self.bytes_up = self.bytes_up.saturating_add(up);
        self.bytes_down = self.bytes_down.saturating_add(down);
        if a.late {
            self.late_records += 1;
            self.late_bytes = self.late_bytes.saturating_add(up.saturating_add(down));
        }
        self.through_seq = self.through_seq.max(to_i64(a.seq));
    }
}

pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn change_key(e: &ActionEvent) -> (String, i64) {
    match e {
        ActionEvent::CardState(c) => (c.iccid.to_string(), c.event_time.0),
        ActionEvent::PoolState(p) => (p.pool.to_string(), p.event_time.0),
        ActionEvent::RuleFired(r) => (r.target(), r.event_time.0),
        ActionEvent::LateCrossing(l) => (l.target(), l.event_time.0),
    }
}

pub(super) fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(to_i64)
}

pub(super) fn reasons_text(r: Reasons) -> String {
    r.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(",")
}

/// `keys` as text, formatted once per run of equal neighbours (a chunk's
/// usage rows are sorted by card, so a card's rows and their cycle come
/// together): the texts, and the index of each key's among them.
pub(super) fn run_texts<K: PartialEq + std::fmt::Display>(
    keys: impl Iterator<Item = K>,
) -> (Vec<String>, Vec<u32>) {
    let (mut texts, mut at, mut last) = (Vec::new(), Vec::new(), None);
    for key in keys {
        if last.as_ref() != Some(&key) {
            texts.push(key.to_string());
            last = Some(key);
        }
        at.push(u32::try_from(texts.len() - 1).unwrap_or(u32::MAX));
    }
    (texts, at)
}

pub(super) fn usage_batch(rows: &[Accounted]) -> Result<RecordBatch, ArrowError> {
    let (iccids, iccid_at) = run_texts(rows.iter().map(|a| a.usage.iccid));
    let (cycles, cycle_at) = run_texts(rows.iter().map(|a| a.cycle));
    pub(super) fn text(texts: &[String], i: u32) -> Option<&str> {
        texts.get(i as usize).map(String::as_str)
    }
    let mut c = Columns::new(table_schema(schema::USAGE_RECORDS));
    c.utf8(iccid_at.iter().map(|&i| text(&iccids, i)));
    c.utf8(rows.iter().map(|a| Some(a.usage.record_id.as_str())));
    c.ts(rows.iter().map(|a| a.usage.start.map(|t| t.0)));
    c.ts(rows.iter().map(|a| Some(a.usage.end.0)));
    c.i64(rows.iter().map(|a| Some(to_i64(a.usage.bytes_up))));
    c.i64(rows.iter().map(|a| Some(to_i64(a.usage.bytes_down))));
    c.i64(rows.iter().map(|a| Some(to_i64(a.usage.bytes()))));
    c.dict(rows.iter().map(|a| a.usage.carrier.map(Carrier::as_str)));
    c.dict(cycle_at.iter().map(|&i| text(&cycles, i)));
    c.bool(rows.iter().map(|a| a.counted));
    c.bool(rows.iter().map(|a| a.late));
    c.i64(rows.iter().map(|a| Some(to_i64(a.seq))));
    c.finish()
}

pub(super) fn sums_columns<'a>(c: &mut Columns, sums: impl Iterator<Item = &'a UsageSums> + Clone) {
    c.i64(sums.clone().map(|s| Some(s.records)));
    c.i64(sums.clone().map(|s| Some(s.bytes_up)));
    c.i64(sums.clone().map(|s| Some(s.bytes_down)));
    c.i64(
        sums.clone()
            .map(|s| Some(s.bytes_up.saturating_add(s.bytes_down))),
    );
    c.i64(sums.clone().map(|s| Some(s.late_records)));
    c.i64(sums.clone().map(|s| Some(s.late_bytes)));
    c.i64(sums.map(|s| Some(s.through_seq)));
}

pub(super) fn table_schema(name: &str) -> arrow::datatypes::SchemaRef {
    schema::tables()
        .into_iter()
        .find(|t| t.name == name)
        .map(|t| t.schema)
        .unwrap_or_else(|| std::sync::Arc::new(arrow::datatypes::Schema::empty()))
}

pub(super) fn daily_batch(
    day: i64,
    rows: &[(Iccid, UsageSums)],
) -> Result<RecordBatch, ArrowError> {
    let iccids: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
    let mut c = Columns::new(table_schema(schema::CARD_DAILY_USAGE_PARTS));
    c.utf8(iccids.iter().map(|s| Some(s.as_str())));
    let day32 = i32::try_from(day).unwrap_or(i32::MAX);
    c.date(rows.iter().map(|_| day32));
    sums_columns(&mut c, rows.iter().map(|r| &r.1));
    c.finish()
}

pub(super) fn cycle_batch(
    rows: &[(Iccid, Option<Carrier>, UsageSums)],
) -> Result<RecordBatch, ArrowError> {
    let iccids: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
    let mut c = Columns::new(table_schema(schema::CARD_CYCLE_USAGE_PARTS));
    c.utf8(iccids.iter().map(|s| Some(s.as_str())));
    c.dict(rows.iter().map(|r| r.1.map(Carrier::as_str)));
    sums_columns(&mut c, rows.iter().map(|r| &r.2));
    c.finish()
}

pub(super) fn quarantine_batch(rows: &[Quarantined]) -> Result<RecordBatch, ArrowError> {
    let mut c = Columns::new(table_schema(schema::QUARANTINE));
    c.i64(rows.iter().map(|q| Some(to_i64(q.seq))));
    c.dict(rows.iter().map(|q| Some(q.reason.as_str())));
    c.utf8(rows.iter().map(|q| Some(q.message.as_str())));
    c.utf8(rows.iter().map(|q| q.iccid.as_deref()));
    c.utf8(rows.iter().map(|q| q.record_id.as_deref()));
    c.dict(
        rows.iter()
            .map(|q| q.source.as_ref().map(|s| s.topic.as_str())),
    );
    c.i32(rows.iter().map(|q| q.source.as_ref().map(|s| s.partition)));
    c.i64(rows.iter().map(|q| q.source.as_ref().map(|s| s.offset)));
    c.ts(rows
        .iter()
        .map(|q| q.source.as_ref().and_then(|s| s.timestamp_ms)));
    c.binary(rows.iter().map(|q| q.raw.as_slice()));
    c.finish()
}

pub(super) struct ChangeText {
    subject: &'static str,
    iccid: Option<String>,
    pool: Option<String>,
    old: String,
    new: String,
    reasons: String,
    event_time: i64,
    processed_at: Option<i64>,
    cycle: String,
    usage: u64,
    limit: Option<u64>,
    overshoot: Option<u64>,
    cause: &'static str,
    cause_id: String,
    cause_iccid: Option<String>,
}

pub(super) fn cause_text(c: &Cause) -> (&'static str, String, Option<String>) {
    // The same split as `rule_executions`.
    flowcap_rules::execution::cause_parts(c)
}

pub(super) fn change_text(e: &ActionEvent) -> ChangeText {
    let (cause, cause_id, cause_iccid) = cause_text(e.cause());
    match e {
        ActionEvent::CardState(c) => ChangeText {
            subject: "card",
            iccid: Some(c.iccid.to_string()),
            pool: None,
            old: c.old.as_str().to_owned(),
            new: c.new.as_str().to_owned(),
            reasons: reasons_text(c.reasons),
            event_time: c.event_time.0,
            processed_at: c.processed_at.map(|t| t.0),
            cycle: c.cycle.to_string(),
            usage: c.usage_bytes,
            limit: c.limit_bytes,
            overshoot: c.overshoot_bytes,
            cause,
            cause_id,
            cause_iccid,
        },
        ActionEvent::PoolState(p) => ChangeText {
            subject: "pool",
            iccid: None,
            pool: Some(p.pool.to_string()),
            old: serde_name(&p.old),
            new: serde_name(&p.new),
            reasons: String::new(),
            event_time: p.event_time.0,
            processed_at: p.processed_at.map(|t| t.0),
            cycle: p.cycle.to_string(),
            usage: p.usage_bytes,
            limit: p.limit_bytes,
            overshoot: p.overshoot_bytes,
            cause,
            cause_id,
            cause_iccid,
        },
        // No state changed: old and new are `late_crossing`, the reasons
        // those the closed cycle gained, the cycle the closed one.
        ActionEvent::LateCrossing(l) => ChangeText {
            subject: if l.iccid.is_some() { "card" } else { "pool" },
            iccid: l.iccid.map(|i| i.to_string()),
            pool: l.pool.as_ref().map(|p| p.to_string()),
            old: "late_crossing".to_owned(),
            new: "late_crossing".to_owned(),
            reasons: reasons_text(l.reasons),
            event_time: l.event_time.0,
            processed_at: l.processed_at.map(|t| t.0),
            cycle: l.cycle.to_string(),
            usage: l.usage_bytes,
            limit: Some(l.limit_bytes),
            overshoot: Some(l.overshoot_bytes),
            cause,
            cause_id,
            cause_iccid,
        },
        // Never buffered as a state change (see `action`).
        ActionEvent::RuleFired(r) => ChangeText {
            subject: "rule",
            iccid: r.iccid.map(|i| i.to_string()),
            pool: r.pool.as_ref().map(|p| p.to_string()),
            old: String::new(),
            new: String::new(),
            reasons: String::new(),
            event_time: r.event_time.0,
            processed_at: r.processed_at.map(|t| t.0),
            cycle: r.cycle.to_string(),
            usage: 0,
            limit: None,
            overshoot: None,
            cause,
            cause_id,
            cause_iccid,
        },
    }
}

pub(super) fn changes_batch(rows: &[StateChange]) -> Result<RecordBatch, ArrowError> {
    let t: Vec<ChangeText> = rows.iter().map(|r| change_text(&r.event)).collect();
    let mut c = Columns::new(table_schema(schema::STATE_CHANGES));
    c.utf8(rows.iter().map(|r| Some(r.event.id())));
    c.dict(t.iter().map(|x| Some(x.subject)));
    c.utf8(t.iter().map(|x| x.iccid.as_deref()));
    c.utf8(t.iter().map(|x| x.pool.as_deref()));
    c.dict(t.iter().map(|x| Some(x.old.as_str())));
    c.dict(t.iter().map(|x| Some(x.new.as_str())));
    c.utf8(t.iter().map(|x| Some(x.reasons.as_str())));
    c.ts(t.iter().map(|x| Some(x.event_time)));
    c.ts(t.iter().map(|x| x.processed_at));
    c.dict(t.iter().map(|x| Some(x.cycle.as_str())));
    c.i64(t.iter().map(|x| Some(to_i64(x.usage))));
    c.i64(t.iter().map(|x| opt_i64(x.limit)));
    c.i64(t.iter().map(|x| opt_i64(x.overshoot)));
    c.dict(t.iter().map(|x| Some(x.cause)));
    c.utf8(t.iter().map(|x| Some(x.cause_id.as_str())));
    c.utf8(t.iter().map(|x| x.cause_iccid.as_deref()));
    c.finish()
}

pub(super) fn executions_batch(rows: &[ExecutionRecord]) -> Result<RecordBatch, ArrowError> {
    let mut c = Columns::new(table_schema(schema::RULE_EXECUTIONS));
    c.utf8(rows.iter().map(|r| Some(r.execution_id.as_str())));
    c.utf8(rows.iter().map(|r| Some(r.firing_id.as_str())));
    c.utf8(rows.iter().map(|r| Some(r.rule.as_str())));
    c.i32(rows.iter().map(|r| Some(r.rule_type)));
    c.utf8(rows.iter().map(|r| r.iccid.as_deref()));
    c.utf8(rows.iter().map(|r| r.pool_id.as_deref()));
    c.utf8(rows.iter().map(|r| Some(r.condition.as_str())));
    c.utf8(rows.iter().map(|r| Some(r.observed.as_str())));
    c.dict(rows.iter().map(|r| Some(r.cause.as_str())));
    c.utf8(rows.iter().map(|r| Some(r.cause_id.as_str())));
    c.utf8(rows.iter().map(|r| r.cause_iccid.as_deref()));
    c.dict(rows.iter().map(|r| Some(r.channel.as_str())));
    c.utf8(rows.iter().map(|r| r.endpoint.as_deref()));
    c.dict(rows.iter().map(|r| Some(r.reminder.as_str())));
    c.i32(rows.iter().map(|r| Some(r.attempts)));
    c.dict(rows.iter().map(|r| Some(r.outcome.as_str())));
    c.ts(rows.iter().map(|r| Some(r.fired_at.0)));
    c.dict(rows.iter().map(|r| Some(r.cycle.as_str())));
    c.finish()
}

pub(super) fn deliveries_batch(rows: &[DeliveryRow]) -> Result<RecordBatch, ArrowError> {
    // One row per execution the message carried (an alert carries one).
    let flat: Vec<(&DeliveryRow, &str)> = rows
        .iter()
        .flat_map(|r| r.message.executions.iter().map(move |e| (r, e.as_str())))
        .collect();
    let recipients: Vec<String> = flat.iter().map(|(r, _)| r.message.to.join(",")).collect();
    let mut c = Columns::new(table_schema(schema::RULE_DELIVERIES));
    c.utf8(flat.iter().map(|(_, e)| Some(*e)));
    c.utf8(flat.iter().map(|(r, _)| Some(r.message.id.as_str())));
    c.dict(flat.iter().map(|(r, _)| Some(r.message.channel.as_str())));
    c.dict(flat.iter().map(|(r, _)| Some(r.destination.as_str())));
    c.utf8(
        recipients
            .iter()
            .map(|t| (!t.is_empty()).then_some(t.as_str())),
    );
    c.utf8(flat.iter().map(|(r, _)| r.message.rule.as_deref()));
    c.bool(flat.iter().map(|(r, _)| r.message.alert_for.is_some()));
    c.i32(
        flat.iter()
            .map(|(r, _)| Some(i32::try_from(r.done.attempts).unwrap_or(i32::MAX))),
    );
    c.dict(flat.iter().map(|(r, _)| Some(r.done.outcome.as_str())));
    c.i32(flat.iter().map(|(r, _)| r.done.status.map(i32::from)));
    c.utf8(flat.iter().map(|(r, _)| r.done.error.as_deref()));
    c.ts(flat.iter().map(|(r, _)| Some(r.message.queued_ms)));
    c.ts(flat.iter().map(|(r, _)| Some(r.done.at_ms)));
    c.finish()
}

pub(super) fn journal_batch(rows: &[JournalRow]) -> Result<RecordBatch, ArrowError> {
    let mut c = Columns::new(table_schema(schema::COMMAND_JOURNAL));
    c.i64(rows.iter().map(|r| Some(to_i64(r.seq))));
    c.utf8(rows.iter().map(|r| Some(r.command_id.as_str())));
    c.dict(rows.iter().map(|r| r.command_type.as_deref()));
    c.ts(rows.iter().map(|r| r.at));
    c.utf8(rows.iter().map(|r| r.operator.as_deref()));
    c.bool(rows.iter().map(|r| r.ok));
    c.dict(rows.iter().map(|r| r.error_code.as_deref()));
    c.utf8(rows.iter().map(|r| r.error_message.as_deref()));
    c.i64(rows.iter().map(|r| Some(r.failed_cards)));
    c.bool(rows.iter().map(|r| r.repeat));
    c.utf8(rows.iter().map(|r| Some(r.command.as_str())));
    c.utf8(rows.iter().map(|r| Some(r.result.as_str())));
    c.finish()
}

pub(super) fn pools_batch(
    rows: &[&PoolView],
    through: u64,
    clock: Timestamp,
) -> Result<RecordBatch, ArrowError> {
    let rows: Vec<PoolRow<'_>> = rows
        .iter()
        .map(|p| PoolRow {
            id: p.id.to_string(),
            name: &p.name,
            kind: serde_name(&p.kind),
            carrier: p.carrier,
            state: serde_name(&p.state),
            members: p.members.len() as u64,
            usage_bytes: p.usage_bytes,
            allowance_bytes: p.allowance_bytes,
            as_of: clock,
            final_total: false,
        })
        .collect();
    pool_cycle_batch(&rows, through)
}

/// Closed cycles' pool totals (`pool_cycle_usage` rows with `final` true
/// once the lateness has passed), as of the snapshot through `through`.
pub(super) fn closed_pools_batch(
    rows: &[&PoolCycleTotal],
    through: u64,
) -> Result<RecordBatch, ArrowError> {
    let rows: Vec<PoolRow<'_>> = rows
        .iter()
        .map(|p| PoolRow {
            id: p.pool.to_string(),
            name: &p.name,
            kind: serde_name(&p.kind),
            carrier: p.carrier,
            state: serde_name(&p.state),
            members: p.members,
            usage_bytes: p.usage_bytes,
            allowance_bytes: p.allowance_bytes,
            as_of: p.at,
            final_total: p.final_total,
        })
        .collect();
    pool_cycle_batch(&rows, through)
}

/// One `pool_cycle_usage` row, from a pool's live view or a closed
/// cycle's total.
struct PoolRow<'a> {
    id: String,
    name: &'a str,
    kind: String,
    carrier: Option<Carrier>,
    state: String,
    members: u64,
    usage_bytes: u64,
    allowance_bytes: u64,
    as_of: Timestamp,
    final_total: bool,
}

fn pool_cycle_batch(rows: &[PoolRow<'_>], through: u64) -> Result<RecordBatch, ArrowError> {
    let mut c = Columns::new(table_schema(schema::POOL_CYCLE_USAGE));
    c.utf8(rows.iter().map(|p| Some(p.id.as_str())));
    c.utf8(rows.iter().map(|p| Some(p.name)));
    c.dict(rows.iter().map(|p| Some(p.kind.as_str())));
    c.dict(rows.iter().map(|p| p.carrier.map(Carrier::as_str)));
    c.dict(rows.iter().map(|p| Some(p.state.as_str())));
    c.i64(rows.iter().map(|p| Some(to_i64(p.members))));
    c.i64(rows.iter().map(|p| Some(to_i64(p.usage_bytes))));
    c.i64(rows.iter().map(|p| Some(to_i64(p.allowance_bytes))));
    c.i64(
        rows.iter()
            .map(|p| Some(to_i64(p.allowance_bytes) - to_i64(p.usage_bytes))),
    );
    c.ts(rows.iter().map(|p| Some(p.as_of.0)));
    c.i64(rows.iter().map(|_| Some(to_i64(through))));
    c.bool(rows.iter().map(|p| p.final_total));
    c.finish()
}

/// The `cards` rows of `rows`; `attribute_names` are the declared custom
/// attribute names, slot by slot (`attr_1` is the first).
pub(super) fn cards_batch(
    rows: &[CardView],
    attribute_names: &[String],
    through: u64,
    clock: Timestamp,
) -> Result<RecordBatch, ArrowError> {
    let iccids: Vec<String> = rows.iter().map(|r| r.iccid.to_string()).collect();
    let cycles: Vec<String> = rows.iter().map(|r| r.cycle.to_string()).collect();
    let reasons: Vec<String> = rows.iter().map(|r| reasons_text(r.reasons)).collect();
    let plans: Vec<Option<String>> = rows
        .iter()
        .map(|r| r.plan.as_ref().map(|p| p.to_string()))
        .collect();
    let pools: Vec<Option<String>> = rows
        .iter()
        .map(|r| r.pool.as_ref().map(|p| p.to_string()))
        .collect();
    let tags: Vec<String> = rows
        .iter()
        .map(|r| {
            r.tags
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let mut c = Columns::new(table_schema(schema::CARDS));
    c.utf8(iccids.iter().map(|s| Some(s.as_str())));
    c.dict(rows.iter().map(|r| Some(r.carrier.as_str())));
    c.utf8(plans.iter().map(|p| p.as_deref()));
    c.dict(rows.iter().map(|r| Some(r.state.as_str())));
    c.utf8(reasons.iter().map(|s| Some(s.as_str())));
    c.dict(cycles.iter().map(|s| Some(s.as_str())));
    c.i64(rows.iter().map(|r| Some(to_i64(r.usage_bytes))));
    c.i64(rows.iter().map(|r| Some(r.threshold_mb)));
    c.i64(rows.iter().map(|r| Some(to_i64(r.addon_mb))));
    c.utf8(pools.iter().map(|p| p.as_deref()));
    c.utf8(tags.iter().map(|s| Some(s.as_str())));
    c.ts(rows.iter().map(|r| r.activated_at.map(|t| t.0)));
    c.ts(rows.iter().map(|r| r.expires_at.map(|t| t.0)));
    c.utf8(rows.iter().map(|r| r.msisdn.as_deref()));
    c.utf8(rows.iter().map(|r| r.imsi.as_deref()));
    c.utf8(rows.iter().map(|r| r.imei.as_deref()));
    for slot in 0..MAX_ATTRIBUTE_NAMES {
        let name = attribute_names.get(slot);
        c.utf8(
            rows.iter()
                .map(|r| name.and_then(|n| r.attributes.get(n)).map(String::as_str)),
        );
    }
    c.ts(rows.iter().map(|_| Some(clock.0)));
    c.i64(rows.iter().map(|_| Some(to_i64(through))));
    c.finish()
}
