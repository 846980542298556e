//! `sql_report`'s charts: query times (log scale, both engines) and the
//! history-cost rounds.

use std::path::Path;

use plotters::prelude::*;

use super::{Frame, PlotError};

/// One query's median times in both engines, milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct QueryTimes<'a> {
    pub name: &'a str,
    pub datafusion_ms: f64,
    pub duckdb_ms: f64,
}

/// Draws `sql_times.png`: a pair of bars per query, 100 ms marked.
pub fn query_times(queries: &[QueryTimes<'_>], path: &Path, labels: bool) -> Result<(), PlotError> {
    let n = queries.len();
    let root = BitMapBackend::new(path, (1000, 60 + 42 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = queries
        .iter()
        .flat_map(|q| [q.datafusion_ms, q.duckdb_ms])
        .fold(100.0f64, f64::max)
        * 2.0;
    let mut chart = Frame {
        margin: 15,
        caption: "console queries, ms (log scale): DataFusion red, DuckDB blue; green: 100 ms",
        caption_size: 18,
        x_labels: 30,
        y_labels: 330,
    }
    .on(&root, labels)
    .build_cartesian_2d((0.1f64..max).log_scale(), 0.0..n as f64)?;
    if labels {
        let names: Vec<String> = queries.iter().map(|q| q.name.to_owned()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n * 2 + 1)
            .y_label_formatter(&|y| {
                let i = (n as f64 - y - 0.5).round();
                if (n as f64 - y - 0.5 - i).abs() < 0.01 && i >= 0.0 && (i as usize) < n {
                    names[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .x_desc("milliseconds")
            .label_style(("sans-serif", 13))
            .draw()?;
    }
    for (i, q) in queries.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        for (k, (ms, color)) in [(q.datafusion_ms, RED), (q.duckdb_ms, BLUE)]
            .into_iter()
            .enumerate()
        {
            let y0 = y + 0.1 + 0.4 * k as f64;
            chart.draw_series([Rectangle::new(
                [(0.1, y0), (ms.max(0.11), y0 + 0.38)],
                color.mix(0.7).filled(),
            )])?;
        }
    }
    chart.draw_series(LineSeries::new(
        [(100.0, 0.0), (100.0, n as f64)],
        GREEN.stroke_width(2),
    ))?;
    root.present()?;
    Ok(())
}

/// Draws `history_cost.png`: each round's inputs/s as (with the history,
/// without it).
pub fn history_cost(rounds: &[(f64, f64)], path: &Path, labels: bool) -> Result<(), PlotError> {
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = rounds
        .iter()
        .flat_map(|&(with, without)| [with, without])
        .fold(1.0f64, f64::max)
        * 1.2
        / 1000.0;
    let mut chart = Frame {
        margin: 20,
        caption: "embedded ingestion, thousand inputs/s per round: history on (red) / off (blue)",
        caption_size: 17,
        x_labels: 35,
        y_labels: 60,
    }
    .on(&root, labels)
    .build_cartesian_2d(0.0..rounds.len() as f64, 0.0..max)?;
    if labels {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(rounds.len() + 1)
            .x_label_formatter(&|x| format!("round {}", x.round() as usize + 1))
            .y_desc("thousand inputs / s")
            .label_style(("sans-serif", 13))
            .draw()?;
    }
    for (i, &(with, without)) in rounds.iter().enumerate() {
        let x = i as f64;
        for (k, (v, color)) in [(with, RED), (without, BLUE)].into_iter().enumerate() {
            let x0 = x + 0.1 + 0.4 * k as f64;
            chart.draw_series([Rectangle::new(
                [(x0, 0.0), (x0 + 0.38, v / 1000.0)],
                color.mix(0.7).filled(),
            )])?;
        }
    }
    root.present()?;
    Ok(())
}
