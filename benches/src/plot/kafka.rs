//! `kafka_report`'s charts, from its JSON lines (the newest run that has
//! each): throughput bars, records/s and resident memory over time, the
//! latency CDF and the p99 of each second of the paced phase.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use super::{Frame, LineChart, PlotError};

fn newest(lines: &[Value], phase: &str, measure: &str) -> Option<Value> {
    lines
        .iter()
        .rev()
        .find(|l| l["phase"] == phase && l["measure"] == measure)
        .cloned()
}

/// Draws every Kafka chart into `dir` from the JSON lines at `input`.
pub fn draw(input: &Path, dir: &Path) -> Result<(), PlotError> {
    let text = std::fs::read_to_string(input).map_err(|error| PlotError::Read {
        path: input.to_owned(),
        error,
    })?;
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    std::fs::create_dir_all(dir).map_err(|error| PlotError::Create {
        path: dir.to_owned(),
        error,
    })?;
    let labels = super::register_font()?;
    if let Some(summary) = newest(&lines, "throughput", "summary") {
        let path = dir.join("kafka_throughput.png");
        throughput(&summary, &path, labels)?;
        println!("wrote {}", path.display());
        let run = summary["run"].clone();
        let reps: Vec<&Value> = lines
            .iter()
            .filter(|l| l["run"] == run && l["phase"] == "throughput" && l["measure"] == "flowcap")
            .collect();
        if !reps.is_empty() {
            let path = dir.join("kafka_throughput_over_time.png");
            over_time(
                &reps,
                summary["raw_median"].as_f64().unwrap_or(0.0),
                &path,
                labels,
            )?;
            println!("wrote {}", path.display());
            let path = dir.join("kafka_rss_over_time.png");
            rss_over_time(&reps, &path, labels)?;
            println!("wrote {}", path.display());
        }
    }
    if let Some(newest) = newest(&lines, "latency", "summary") {
        // Every latency measurement of that run: flowcap and the broker
        // alone, at each rate.
        let run = newest["run"].clone();
        let of_run: Vec<&Value> = lines
            .iter()
            .filter(|l| {
                l["run"] == run
                    && l["measure"] == "summary"
                    && (l["phase"] == "latency" || l["phase"] == "broker_latency")
            })
            .collect();
        let path = dir.join("kafka_latency_cdf.png");
        latency(&of_run, &path, labels)?;
        println!("wrote {}", path.display());
        let path = dir.join("kafka_latency_per_second.png");
        latency_per_second(&of_run, &path, labels)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// flowcap's records/s over each repetition, with the raw consume
/// median as a line.
fn over_time(reps: &[&Value], raw: f64, path: &Path, labels: bool) -> Result<(), PlotError> {
    let chart = LineChart {
        caption: "flowcap end to end over time, thousand records/s (one line per repetition; blue: raw consume median)",
        x_desc: "seconds since the first message",
        y_desc: "thousand records / s",
        reference: Some(raw / 1000.0),
    };
    chart.draw(&red(series_of(reps, "timeline", 1000.0)), path, labels)
}

/// The p99 of each second of the paced phase: flowcap's (red) and the
/// broker's alone (blue). A snapshot's cut shows as a peak.
fn latency_per_second(summaries: &[&Value], path: &Path, labels: bool) -> Result<(), PlotError> {
    let series = summaries
        .iter()
        .map(|s| {
            let color = if s["phase"] == "latency" { RED } else { BLUE };
            let p99s = s["per_second"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .enumerate()
                        // Seconds without samples (the warm-up) are left out.
                        .filter(|(_, p)| p[0].as_f64().unwrap_or(0.0) > 0.0)
                        .filter_map(|(i, p)| Some((i as f64, p[2].as_f64()?)))
                        .collect()
                })
                .unwrap_or_default();
            (color, p99s)
        })
        .collect::<Vec<_>>();
    let chart = LineChart {
        caption: "p99 latency per second of the paced phase, ms (red: flowcap produce -> action; blue: the broker alone)",
        x_desc: "second of the paced phase",
        y_desc: "p99, ms",
        reference: None,
    };
    chart.draw(&series, path, labels)
}

fn red(series: Vec<Vec<(f64, f64)>>) -> Vec<(RGBColor, Vec<(f64, f64)>)> {
    series.into_iter().map(|s| (RED, s)).collect()
}

/// flowcap's resident memory over each repetition (its whole life:
/// start-up before 0, the final snapshot after the last record).
fn rss_over_time(reps: &[&Value], path: &Path, labels: bool) -> Result<(), PlotError> {
    let chart = LineChart {
        caption: "flowcap resident memory (VmRSS) over time, MiB (one line per repetition)",
        x_desc: "seconds since the first message",
        y_desc: "MiB",
        reference: None,
    };
    chart.draw(&red(series_of(reps, "rss_timeline", 1.0)), path, labels)
}

/// Each repetition's `key` array of `[seconds, value]` pairs, values
/// divided by `unit`.
fn series_of(reps: &[&Value], key: &str, unit: f64) -> Vec<Vec<(f64, f64)>> {
    reps.iter()
        .map(|r| {
            r[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()? / unit)))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

fn rates(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn throughput(summary: &Value, path: &Path, labels: bool) -> Result<(), PlotError> {
    let bars = [
        ("raw rdkafka consume", rates(&summary["raw_rates"]), BLUE),
        ("flowcap end to end", rates(&summary["flowcap_rates"]), RED),
    ];
    let ymax = bars
        .iter()
        .flat_map(|(_, r, _)| r.iter().copied())
        .fold(300_000.0f64, f64::max)
        * 1.15
        / 1000.0;
    let root = BitMapBackend::new(path, (800, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = Frame {
        margin: 20,
        caption: "Kafka usage topic: records/s (median bar, repetitions as dots; green: 300k goal)",
        caption_size: 20,
        x_labels: 40,
        y_labels: 70,
    }
    .on(&root, labels)
    .build_cartesian_2d(0.0..2.0f64, 0.0..ymax)?;
    if labels {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("thousand records / s")
            .label_style(("sans-serif", 14))
            .draw()?;
    }
    for (i, (name, r, color)) in bars.iter().enumerate() {
        let median = crate::median(r) / 1000.0;
        let x0 = i as f64 + 0.2;
        chart.draw_series([Rectangle::new(
            [(x0, 0.0), (x0 + 0.6, median)],
            color.mix(0.6).filled(),
        )])?;
        chart.draw_series(
            r.iter()
                .map(|v| Circle::new((x0 + 0.3, v / 1000.0), 4, BLACK.filled())),
        )?;
        if labels {
            chart.draw_series([Text::new(
                format!("{name}: {median:.0}k/s"),
                (x0, median + ymax * 0.04),
                ("sans-serif", 15).into_font(),
            )])?;
        }
    }
    // The absolute goal.
    chart.draw_series(LineSeries::new(
        [(0.0, 300.0), (2.0, 300.0)],
        GREEN.stroke_width(2),
    ))?;
    root.present()?;
    Ok(())
}

fn latency(summaries: &[&Value], path: &Path, labels: bool) -> Result<(), PlotError> {
    let cdf = |v: &Value| -> Vec<(f64, f64)> {
        v["cdf"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p[0].as_f64()?.max(0.1), p[1].as_f64()? * 100.0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    type Series = (String, Vec<(f64, f64)>, bool);
    let series: Vec<Series> = summaries
        .iter()
        .map(|s| {
            let flowcap = s["phase"] == "latency";
            let rate = if flowcap {
                s["rate_achieved"].as_f64()
            } else {
                s["rate"].as_f64()
            }
            .unwrap_or(0.0);
            let label = if flowcap {
                format!(
                    "flowcap: produce -> action, {:.0}k records/s",
                    rate / 1000.0
                )
            } else {
                format!(
                    "broker alone: produce -> consumer, {:.0}k records/s",
                    rate / 1000.0
                )
            };
            (label, cdf(s), flowcap)
        })
        .collect();
    let xmax = series
        .iter()
        .flat_map(|(_, d, _)| d.iter().map(|p| p.0))
        .fold(20.0f64, f64::max)
        * 1.2;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = Frame {
        margin: 20,
        caption: "Kafka pipeline latency (CDF; green: the 10 ms p99 goal)",
        caption_size: 20,
        x_labels: 45,
        y_labels: 60,
    }
    .on(&root, labels)
    .build_cartesian_2d((0.1..xmax).log_scale(), 0.0..100.0f64)?;
    if labels {
        chart
            .configure_mesh()
            .x_desc("latency, ms (log)")
            .y_desc("percent of samples at or below")
            .label_style(("sans-serif", 14))
            .draw()?;
    }
    chart.draw_series(LineSeries::new(
        [(10.0, 0.0), (10.0, 100.0)],
        GREEN.stroke_width(1),
    ))?;
    let palette = [RED, BLUE, MAGENTA, CYAN, BLACK];
    let (mut flowcap_i, mut broker_i) = (0usize, 0usize);
    for (label, data, flowcap) in series {
        let color = if flowcap {
            flowcap_i += 1;
            palette[(flowcap_i - 1) * 2 % palette.len()]
        } else {
            broker_i += 1;
            palette[((broker_i - 1) * 2 + 1) % palette.len()]
        };
        let width = if flowcap { 2 } else { 1 };
        let s = chart.draw_series(LineSeries::new(data, color.stroke_width(width)))?;
        if labels {
            s.label(label).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], color.stroke_width(width))
            });
        }
    }
    if labels {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
