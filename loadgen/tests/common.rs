#![allow(dead_code, unreachable_pub)]
//! Helpers shared by the integration tests.

use flowcap_engine::{Iccid, Timestamp};
use flowcap_loadgen::{Workload, WorkloadConfig};

/// A small config: `cards` cards, `hours` hours, one record per card-hour,
/// no faults.
pub fn quiet(cards: u64, hours: u32) -> WorkloadConfig {
    WorkloadConfig {
        cards,
        duration_hours: hours,
        duplicate_pct: 0.0,
        malformed_pct: 0.0,
        unknown_card_pct: 0.0,
        late_pct: 0.0,
        out_of_order_pct: 0.0,
        ..WorkloadConfig::default()
    }
}

pub fn ts(s: &str) -> Timestamp {
    Timestamp::parse_rfc3339(s).unwrap()
}

/// Every record as JSON lines, joined by `\n`.
pub fn all_lines(workload: &Workload) -> String {
    let mut out = String::new();
    for record in workload.records() {
        record.to_json_line(&mut out);
        out.push('\n');
    }
    out
}

/// Every setup command as JSON lines.
pub fn setup_lines(workload: &Workload) -> String {
    let mut out = String::new();
    for command in workload.setup_commands() {
        out.push_str(&serde_json::to_string(&command).unwrap());
        out.push('\n');
    }
    out
}

/// A strict reader of SPEC section 4 records, independent of the
/// generator: `Ok((record_id, iccid, end, bytes))` or why not.
pub fn strict_parse(
    line: &str,
    arrival: Timestamp,
) -> Result<(String, Iccid, Timestamp, u64), String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("json: {e}"))?;
    let obj = v.as_object().ok_or("not an object")?;
    let text = |name: &str| -> Result<&str, String> {
        obj.get(name)
            .ok_or(format!("missing {name}"))?
            .as_str()
            .ok_or(format!("{name} not a string"))
    };
    let number = |name: &str| -> Result<u64, String> {
        let n = obj.get(name).ok_or(format!("missing {name}"))?;
        let n = n
            .as_u64()
            .ok_or(format!("{name} not a non-negative integer"))?;
        if n > 1 << 50 {
            return Err(format!("{name} absurd"));
        }
        Ok(n)
    };
    let record_id = text("record_id")?.to_owned();
    let iccid = Iccid::parse(text("iccid")?).map_err(|e| e.to_string())?;
    let end = Timestamp::parse_rfc3339(text("end")?).map_err(|e| e.to_string())?;
    if let Some(start) = obj.get("start") {
        let start = Timestamp::parse_rfc3339(start.as_str().ok_or("start not a string")?)
            .map_err(|e| e.to_string())?;
        if end < start {
            return Err("end before start".into());
        }
    }
    if end > arrival.plus_millis(86_400_000) {
        return Err("end far in the future".into());
    }
    let bytes = number("bytes_up")? + number("bytes_down")?;
    Ok((record_id, iccid, end, bytes))
}
