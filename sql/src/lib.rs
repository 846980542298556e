//! # flowcap-sql
//!
//! SQL over the Parquet history with DataFusion.
//!
//! [`open`] registers every table of [`flowcap_storage::history::schema::tables`] as a
//! listing table over its directory, with its partition column (`date` or
//! `cycle`, strings) so that a `WHERE date >= '2026-10-01'` prunes whole
//! directories, plus the views:
//!
//! - `card_daily_usage`: `card_daily_usage_parts` summed per card and day;
//! - `card_cycle_usage`: `card_cycle_usage_parts` summed per card and cycle;
//! - `cards_current`: the newest `cards` dump.
//!
//! [`ConsoleQuery`] holds the console's queries (SPEC section 8) as SQL
//! text, so that the same text runs on DuckDB in the tests and benchmarks.
//! "Now" for them is the newest `date` partition in the history (event
//! time), not the wall clock: a replayed or generated history is queried as
//! of its own end.

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::sqlparser::ast::Statement;

use flowcap_storage::history::schema::{self, TableDef};
use flowcap_storage::location::{HistoryLocation, LocationError};

/// Errors of SQL over the history.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// DataFusion refused or failed the query.
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
    /// The statement is not a read-only query.
    #[error("only read-only queries are allowed (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE); got {0}")]
    NotReadOnly(String),
    /// A console query argument is not valid.
    #[error("{0}")]
    BadArgument(String),
    /// The history directory could not be read.
    #[error("history {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The history location could not be listed.
    #[error(transparent)]
    Location(#[from] LocationError),
    /// The object store could not be listed.
    #[error("history {url}: {source}")]
    Store {
        /// What was listed.
        url: String,
        /// The cause.
        source: object_store::Error,
    },
}

/// Views over the tables (name, SQL).
pub const VIEWS: [(&str, &str); 3] = [
    (
        "card_daily_usage",
        "SELECT iccid, day, date, SUM(records) AS records, SUM(bytes_up) AS bytes_up, \
         SUM(bytes_down) AS bytes_down, SUM(bytes) AS bytes, SUM(late_records) AS late_records, \
         SUM(late_bytes) AS late_bytes \
         FROM card_daily_usage_parts GROUP BY iccid, day, date",
    ),
    (
        "card_cycle_usage",
        "SELECT iccid, cycle, SUM(records) AS records, SUM(bytes_up) AS bytes_up, \
         SUM(bytes_down) AS bytes_down, SUM(bytes) AS bytes, SUM(late_records) AS late_records, \
         SUM(late_bytes) AS late_bytes \
         FROM card_cycle_usage_parts GROUP BY iccid, cycle",
    ),
    (
        "cards_current",
        "SELECT * FROM cards WHERE date = (SELECT MAX(date) FROM cards)",
    ),
];

/// A session over the history at `location`: every table and view
/// registered (and, for an object store, the store). Tables without files
/// yet are empty (with their schema).
pub async fn open(location: &HistoryLocation) -> Result<SessionContext, SqlError> {
    open_in(location, Arc::new(RuntimeEnv::default())).await
}

/// [`open`] in a given runtime: its memory pool bounds what the session's
/// queries may hold (`POST /sql` shares one [`limited_runtime`] among its
/// sessions).
pub async fn open_in(
    location: &HistoryLocation,
    runtime: Arc<RuntimeEnv>,
) -> Result<SessionContext, SqlError> {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_default_catalog_and_schema("flowcap", "history");
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    if let HistoryLocation::Remote(remote) = location {
        ctx.register_object_store(&remote.bucket_url(), remote.store());
    }
    for table in schema::tables() {
        register(&ctx, location, &table).await?;
    }
    for (name, sql) in VIEWS {
        let view = ctx.sql(&format!("CREATE VIEW {name} AS {sql}")).await?;
        view.collect().await?;
    }
    Ok(ctx)
}

async fn register(
    ctx: &SessionContext,
    location: &HistoryLocation,
    table: &TableDef,
) -> Result<(), SqlError> {
    let partition = table.partitioning.column().to_owned();
    if partitions(location, table.name).await?.is_empty() {
        let mut fields: Vec<_> = table.schema.fields().iter().cloned().collect();
        fields.push(Arc::new(datafusion::arrow::datatypes::Field::new(
            partition,
            DataType::Utf8,
            false,
        )));
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(fields));
        let empty = MemTable::try_new(schema, vec![vec![]])?;
        ctx.register_table(table.name, Arc::new(empty))?;
        return Ok(());
    }
    let url = ListingTableUrl::parse(location.table_url(table.name)?)?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(vec![(partition, DataType::Utf8)]);
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(table.schema.clone());
    ctx.register_table(table.name, Arc::new(ListingTable::try_new(config)?))?;
    Ok(())
}

/// The partition values (`2026-11-01` of `date=2026-11-01`) a table has,
/// from directory names alone, unsorted.
pub async fn partitions(location: &HistoryLocation, table: &str) -> Result<Vec<String>, SqlError> {
    let Some(def) = schema::tables().into_iter().find(|t| t.name == table) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{}=", def.partitioning.column());
    let names: Vec<String> = match location {
        HistoryLocation::Local(root) => match std::fs::read_dir(root.join(table)) {
            Ok(dir) => dir
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(SqlError::Io {
                    path: root.join(table),
                    source,
                })
            }
        },
        HistoryLocation::Remote(remote) => {
            let dir = remote.object(table);
            let listed = remote
                .store()
                .list_with_delimiter(Some(&dir))
                .await
                .map_err(|source| SqlError::Store {
                    url: format!("{location}/{table}"),
                    source,
                })?;
            listed
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().map(str::to_owned))
                .collect()
        }
    };
    Ok(names
        .into_iter()
        .filter_map(|n| n.strip_prefix(&prefix).map(str::to_owned))
        .collect())
}

/// A runtime whose memory pool holds at most `max_bytes` for all the
/// queries of its sessions together, and that never spills to disk: a
/// query that needs more fails with DataFusion's "Resources exhausted"
/// instead of growing the process (or filling a temporary directory).
pub fn limited_runtime(max_bytes: usize) -> Result<Arc<RuntimeEnv>, SqlError> {
    Ok(RuntimeEnvBuilder::new()
        .with_memory_limit(max_bytes, 1.0)
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()?)
}

/// What SQL from outside may plan: no DDL, no DML (`INSERT`, `COPY`), no
/// statements (`SET`, transactions). Checked on the plan, after
/// [`check_read_only`]'s check of the text.
pub fn read_only_options() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Plans one read-only statement: [`check_read_only`], then the plan
/// checked against [`read_only_options`].
pub async fn plan(ctx: &SessionContext, sql: &str) -> Result<DataFrame, SqlError> {
    check_read_only(ctx, sql)?;
    Ok(ctx.sql_with_options(sql, read_only_options()).await?)
}

/// Runs one read-only statement and collects its result.
pub async fn query(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>, SqlError> {
    Ok(plan(ctx, sql).await?.collect().await?)
}

/// Refuses anything but queries: DDL, DML, `COPY`, `SET` and friends.
pub fn check_read_only(ctx: &SessionContext, sql: &str) -> Result<(), SqlError> {
    let dialect = ctx
        .state()
        .config()
        .options()
        .sql_parser
        .dialect
        .to_string();
    let dialect = datafusion::sql::sqlparser::dialect::dialect_from_str(&dialect)
        .unwrap_or_else(|| Box::new(datafusion::sql::sqlparser::dialect::GenericDialect {}));
    let statements = datafusion::sql::sqlparser::parser::Parser::parse_sql(dialect.as_ref(), sql)
        .map_err(|e| SqlError::DataFusion(DataFusionError::SQL(Box::new(e), None)))?;
    if statements.len() != 1 {
        return Err(SqlError::NotReadOnly(format!(
            "{} statements (send exactly one)",
            statements.len()
        )));
    }
    match &statements[0] {
        Statement::Query(_)
        | Statement::Explain { .. }
        | Statement::ExplainTable { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowViews { .. } => Ok(()),
        other => {
            let text = other.to_string();
            let verb = text.split_whitespace().next().unwrap_or("?").to_uppercase();
            Err(SqlError::NotReadOnly(verb))
        }
    }
}

/// "Now" for the console queries: the newest partitions of the history
/// (event time, not the wall clock).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latest {
    /// Newest `date` with usage.
    pub day: Option<String>,
    /// Newest `cycle` with usage.
    pub cycle: Option<String>,
    /// Newest `date` of a `cards` dump.
    pub cards_date: Option<String>,
}

impl Latest {
    /// Reads them from the partition names at `location`.
    pub async fn of(location: &HistoryLocation) -> Result<Latest, SqlError> {
        let newest = |v: Vec<String>| v.into_iter().max();
        Ok(Latest {
            day: newest(partitions(location, schema::CARD_DAILY_USAGE_PARTS).await?),
            cycle: newest(partitions(location, schema::CARD_CYCLE_USAGE_PARTS).await?),
            cards_date: newest(partitions(location, schema::CARDS).await?),
        })
    }
}

/// The console's queries (SPEC section 8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleQuery {
    /// One card's usage per cycle, the last `cycles` cycles.
    CardCycles {
        /// The card.
        iccid: String,
        /// How many cycles.
        cycles: u32,
    },
    /// One card's usage per day, the `days` days up to the newest.
    CardDays {
        /// The card.
        iccid: String,
        /// How many days.
        days: u32,
    },
    /// Total usage per day, the last `days` days.
    DailyTotals {
        /// How many days.
        days: u32,
    },
    /// Top cards by usage in a cycle (when `None`, each carrier's cycle
    /// as of the newest day).
    TopCards {
        /// The cycle, `YYYY-MM`.
        cycle: Option<String>,
        /// How many cards.
        limit: u32,
    },
    /// A pool's (or every pool's) used / remaining / allowance per cycle,
    /// one row each: a closed cycle's final total once there is one.
    PoolUsage {
        /// One pool, or all.
        pool: Option<String>,
    },
    /// Cards per state, from the newest `cards` dump.
    StateCounts,
    /// Cards whose plan expires within 30, 60 and 90 days of the newest
    /// `cards` dump.
    Expiring,
    /// Rule executions, newest first, optionally for one rule or card.
    RuleExecutions {
        /// One rule.
        rule: Option<String>,
        /// One card.
        iccid: Option<String>,
        /// How many rows.
        limit: u32,
    },
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn check_iccid(iccid: &str) -> Result<(), SqlError> {
    flowcap_engine::Iccid::parse(iccid)
        .map(|_| ())
        .map_err(|e| SqlError::BadArgument(format!("ICCID {iccid:?}: {e}")))
}

/// `YYYY-MM-DD` minus `days` days (the console queries' "the last N
/// days" counts back from the newest day this way).
pub fn days_before(date: &str, days: u32) -> Result<String, SqlError> {
    let bad = || SqlError::BadArgument(format!("not a date: {date:?}"));
    let mut parts = date.splitn(3, '-').map(str::parse::<i64>);
    let (Some(Ok(y)), Some(Ok(m)), Some(Ok(d))) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let m = u32::try_from(m).map_err(|_| bad())?;
    let d = u32::try_from(d).map_err(|_| bad())?;
    let day = flowcap_engine::time::days_from_civil(y, m, d) - i64::from(days);
    Ok(flowcap_storage::history::date_value(day))
}

/// The top-cards query without `--cycle`: each card's usage in its
/// carrier's current cycle as of the local day `date` (`YYYY-MM-DD`), the
/// calendar month, and for `cucc` from the 27th on the next one (the
/// newest cycle partition alone showed only `cucc` cards from the 27th).
/// A card's carrier is the one of the newest `cards` dump (`cards_date`),
/// else the one its records named.
fn top_cards_current(date: &str, cards_date: Option<&str>, limit: u32) -> Result<String, SqlError> {
    let bad = || SqlError::BadArgument(format!("not a date: {date:?}"));
    let month = date
        .get(..7)
        .and_then(flowcap_engine::CycleId::parse)
        .ok_or_else(bad)?;
    let day: u32 = date.get(8..).and_then(|d| d.parse().ok()).ok_or_else(bad)?;
    let group = "GROUP BY u.iccid ORDER BY bytes DESC, u.iccid";
    let select = "SELECT u.iccid, SUM(u.bytes) AS bytes, SUM(u.records) AS records \
                  FROM card_cycle_usage_parts u";
    let month_q = quote(&month.to_string());
    if day < flowcap_engine::cycle::CUCC_CYCLE_START_DAY {
        return Ok(format!(
            "{select} WHERE u.cycle = {month_q} {group} LIMIT {limit}"
        ));
    }
    let next_q = quote(&month.next().to_string());
    let cucc = quote(flowcap_engine::Carrier::Cucc.as_str());
    let (join, carrier) = match cards_date {
        Some(d) => (
            format!(
                " LEFT JOIN (SELECT iccid, CAST(carrier AS VARCHAR) AS carrier FROM cards \
                 WHERE date = {}) c ON c.iccid = u.iccid",
                quote(d)
            ),
            "COALESCE(c.carrier, CAST(u.carrier AS VARCHAR))",
        ),
        None => (String::new(), "CAST(u.carrier AS VARCHAR)"),
    };
    // The `IN` prunes the partitions; the `CASE` picks each card's own.
    Ok(format!(
        "{select}{join} WHERE u.cycle IN ({month_q}, {next_q}) \
         AND u.cycle = CASE WHEN {carrier} = {cucc} THEN {next_q} ELSE {month_q} END \
         {group} LIMIT {limit}"
    ))
}

impl ConsoleQuery {
    /// The SQL text of this query, as of `latest` (the history's newest
    /// partitions). Standard SQL that DuckDB runs too, over `read_parquet`
    /// views of the same names.
    pub fn sql(&self, latest: &Latest) -> Result<String, SqlError> {
        let no_usage = || SqlError::BadArgument("the history has no usage yet".into());
        let newest_day = || latest.day.clone().ok_or_else(no_usage);
        let cards_date = || {
            latest
                .cards_date
                .clone()
                .ok_or_else(|| SqlError::BadArgument("the history has no cards dump yet".into()))
        };
        Ok(match self {
            ConsoleQuery::CardCycles { iccid, cycles } => {
                check_iccid(iccid)?;
                format!(
                    "SELECT cycle, SUM(records) AS records, SUM(bytes) AS bytes, \
                     SUM(late_bytes) AS late_bytes \
                     FROM card_cycle_usage_parts WHERE iccid = {} \
                     GROUP BY cycle ORDER BY cycle DESC LIMIT {cycles}",
                    quote(iccid)
                )
            }
            ConsoleQuery::CardDays { iccid, days } => {
                check_iccid(iccid)?;
                let from = days_before(&newest_day()?, days.saturating_sub(1))?;
                format!(
                    "SELECT date, SUM(records) AS records, SUM(bytes) AS bytes \
                     FROM card_daily_usage_parts WHERE iccid = {} AND date >= {} \
                     GROUP BY date ORDER BY date DESC",
                    quote(iccid),
                    quote(&from)
                )
            }
            ConsoleQuery::DailyTotals { days } => {
                let from = days_before(&newest_day()?, days.saturating_sub(1))?;
                format!(
                    "SELECT date, SUM(records) AS records, SUM(bytes) AS bytes, \
                     COUNT(DISTINCT iccid) AS cards \
                     FROM card_daily_usage_parts WHERE date >= {} \
                     GROUP BY date ORDER BY date",
                    quote(&from)
                )
            }
            ConsoleQuery::TopCards { cycle, limit } => match cycle {
                Some(cycle) => {
                    if flowcap_engine::CycleId::parse(cycle).is_none() {
                        return Err(SqlError::BadArgument(format!(
                            "not a cycle (YYYY-MM): {cycle:?}"
                        )));
                    }
                    format!(
                        "SELECT iccid, SUM(bytes) AS bytes, SUM(records) AS records \
                         FROM card_cycle_usage_parts WHERE cycle = {} \
                         GROUP BY iccid ORDER BY bytes DESC, iccid LIMIT {limit}",
                        quote(cycle)
                    )
                }
                None => top_cards_current(&newest_day()?, latest.cards_date.as_deref(), *limit)?,
            },
            ConsoleQuery::PoolUsage { pool } => {
                let filter = pool
                    .as_ref()
                    .map(|p| format!("WHERE pool_id = {}", quote(p)))
                    .unwrap_or_default();
                // One row per pool and cycle: a closed cycle's final
                // total, else its newest (the rollover's, else a dump's).
                format!(
                    "SELECT cycle, pool_id, kind, state, members, used_bytes, allowance_bytes, \
                     remaining_bytes, as_of FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY \
                     pool_id, cycle ORDER BY final DESC NULLS LAST, as_of DESC) AS newest \
                     FROM pool_cycle_usage {filter}) WHERE newest = 1 \
                     ORDER BY pool_id, cycle DESC"
                )
            }
            ConsoleQuery::StateCounts => {
                let date = cards_date()?;
                format!(
                    "SELECT CAST(state AS VARCHAR) AS state, COUNT(*) AS cards FROM cards \
                     WHERE date = {} GROUP BY CAST(state AS VARCHAR) ORDER BY state",
                    quote(&date)
                )
            }
            ConsoleQuery::Expiring => {
                let date = cards_date()?;
                format!(
                    "SELECT \
                     SUM(CASE WHEN expires_at < as_of + INTERVAL '30 days' THEN 1 ELSE 0 END) AS within_30_days, \
                     SUM(CASE WHEN expires_at < as_of + INTERVAL '60 days' THEN 1 ELSE 0 END) AS within_60_days, \
                     SUM(CASE WHEN expires_at < as_of + INTERVAL '90 days' THEN 1 ELSE 0 END) AS within_90_days \
                     FROM cards WHERE date = {} AND expires_at >= as_of",
                    quote(&date)
                )
            }
            ConsoleQuery::RuleExecutions { rule, iccid, limit } => {
                let mut filters = Vec::new();
                if let Some(r) = rule {
                    filters.push(format!("e.rule = {}", quote(r)));
                }
                if let Some(i) = iccid {
                    check_iccid(i)?;
                    filters.push(format!("e.iccid = {}", quote(i)));
                }
                let filter = if filters.is_empty() {
                    String::new()
                } else {
                    format!("WHERE {}", filters.join(" AND "))
                };
                // The decided row, with the delivery's outcome once there
                // is one (a resend after a machine crash may add a second
                // row: "delivered" wins, attempts add up).
                format!(
                    "SELECT e.fired_at, e.rule, e.rule_type, e.iccid, e.pool_id, e.condition, \
                     e.observed, e.channel, e.endpoint, \
                     COALESCE(d.outcome, CAST(e.outcome AS VARCHAR)) AS outcome, \
                     COALESCE(d.attempts, e.attempts) AS attempts, d.error, d.done_at \
                     FROM rule_executions e LEFT JOIN \
                     (SELECT execution_id, MIN(CAST(outcome AS VARCHAR)) AS outcome, \
                      CAST(SUM(attempts) AS INT) AS attempts, MAX(error) AS error, \
                      MAX(done_at) AS done_at FROM rule_deliveries GROUP BY execution_id) d \
                     ON d.execution_id = e.execution_id {filter} \
                     ORDER BY e.fired_at DESC LIMIT {limit}"
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_before_crosses_months_and_years() {
        assert_eq!(days_before("2026-03-01", 1).unwrap(), "2026-02-28");
        assert_eq!(days_before("2026-01-05", 10).unwrap(), "2025-12-26");
        assert!(days_before("yesterday", 1).is_err());
    }

    #[test]
    fn console_queries_refuse_bad_arguments() {
        let root = &Latest::default();
        let q = ConsoleQuery::CardCycles {
            iccid: "1' OR '1'='1".into(),
            cycles: 6,
        };
        assert!(matches!(q.sql(root), Err(SqlError::BadArgument(_))));
        let q = ConsoleQuery::TopCards {
            cycle: Some("2026-13".into()),
            limit: 10,
        };
        assert!(matches!(q.sql(root), Err(SqlError::BadArgument(_))));
        let q = ConsoleQuery::PoolUsage {
            pool: Some("p'; DROP TABLE x; --".into()),
        };
        assert!(q.sql(root).unwrap().contains("'p''; DROP TABLE x; --'"));
        // "Now" comes from the history: none yet, a clear error.
        assert!(matches!(
            ConsoleQuery::DailyTotals { days: 30 }.sql(root),
            Err(SqlError::BadArgument(m)) if m.contains("no usage")
        ));
        let latest = Latest {
            day: Some("2026-03-05".into()),
            ..Latest::default()
        };
        let text = ConsoleQuery::DailyTotals { days: 5 }.sql(&latest).unwrap();
        assert!(text.contains("date >= '2026-03-01'"), "{text}");
    }

    #[test]
    fn top_cards_takes_each_carriers_current_cycle() {
        let on = |day: &str| Latest {
            day: Some(day.into()),
            cycle: Some("2026-12".into()),
            cards_date: Some(day.into()),
        };
        let q = ConsoleQuery::TopCards {
            cycle: None,
            limit: 10,
        };
        // Before the 27th every carrier is in the calendar month.
        let text = q.sql(&on("2026-11-26")).unwrap();
        assert!(text.contains("WHERE u.cycle = '2026-11' GROUP"), "{text}");
        // From the 27th cucc is in the next cycle, the others are not; the
        // carrier is the cards dump's.
        let text = q.sql(&on("2026-11-27")).unwrap();
        assert!(
            text.contains("cycle IN ('2026-11', '2026-12')")
                && text.contains("WHEN COALESCE(c.carrier, CAST(u.carrier AS VARCHAR)) = 'cucc' THEN '2026-12' ELSE '2026-11'")
                && text.contains("WHERE date = '2026-11-27'"),
            "{text}"
        );
        let text = q.sql(&on("2026-12-31")).unwrap();
        assert!(text.contains("cycle IN ('2026-12', '2027-01')"), "{text}");
        // An explicit cycle is taken as given.
        let q = ConsoleQuery::TopCards {
            cycle: Some("2026-10".into()),
            limit: 10,
        };
        let text = q.sql(&on("2026-11-28")).unwrap();
        assert!(text.contains("WHERE cycle = '2026-10' GROUP"), "{text}");
    }

    #[test]
    fn only_queries_pass_the_read_only_check() {
        let ctx = SessionContext::new();
        for ok in [
            "SELECT 1",
            "WITH a AS (SELECT 1 AS x) SELECT x FROM a",
            "EXPLAIN SELECT 1",
            "SHOW TABLES",
        ] {
            check_read_only(&ctx, ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "CREATE TABLE t AS SELECT 1",
            "COPY (SELECT 1) TO '/tmp/x.csv'",
            "INSERT INTO t VALUES (1)",
            "DROP VIEW card_daily_usage",
            "SET datafusion.execution.batch_size = 1",
            "SELECT 1; DROP TABLE t",
        ] {
            assert!(
                matches!(check_read_only(&ctx, bad), Err(SqlError::NotReadOnly(_))),
                "{bad} passed"
            );
        }
    }
}
