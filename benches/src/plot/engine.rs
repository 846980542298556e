//! `engine_report`'s chart: memory per card against card count, from its
//! JSON lines.

use std::path::Path;

use plotters::prelude::*;

use super::{Frame, PlotError};

struct Point {
    cards: f64,
    lean: bool,
    rss_less_results: f64,
    heap: f64,
}

fn field(line: &str, name: &str) -> Option<f64> {
    let key = format!("\"{name}\":");
    let rest = &line[line.find(&key)? + key.len()..];
    let end = rest.find([',', '}'])?;
    rest[..end].trim_matches('"').parse().ok()
}

fn points(input: &Path) -> Result<Vec<Point>, PlotError> {
    let text = std::fs::read_to_string(input).map_err(|error| PlotError::Read {
        path: input.to_owned(),
        error,
    })?;
    let mut pts: Vec<Point> = text
        .lines()
        .filter_map(|l| {
            let cards = field(l, "cards")?;
            let commands = field(l, "commands")?;
            Some(Point {
                cards,
                lean: l.contains("\"shape\":\"lean\""),
                rss_less_results: (field(l, "rss_delta")? - field(l, "per_command")? * commands)
                    / cards,
                heap: field(l, "heap")? / cards,
            })
        })
        .collect();
    pts.sort_by(|a, b| a.cards.total_cmp(&b.cards));
    Ok(pts)
}

/// Draws `memory_per_card.png` (or any `output` path) from the JSON lines
/// at `input`.
pub fn draw(input: &Path, output: &Path) -> Result<(), PlotError> {
    let pts = points(input)?;
    if pts.is_empty() {
        return Err(PlotError::Empty(input.to_owned()));
    }
    // Text needs a TrueType font; without one the plot has no labels.
    let text = super::register_font()?;
    let root = BitMapBackend::new(output, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = pts
        .iter()
        .map(|p| p.rss_less_results.max(p.heap))
        .fold(120.0f64, f64::max)
        * 1.1;
    let (xmin, xmax) = (
        pts.iter().map(|p| p.cards).fold(f64::MAX, f64::min) * 0.8,
        pts.iter().map(|p| p.cards).fold(0.0, f64::max) * 1.25,
    );
    let mut chart = Frame {
        margin: 20,
        caption: "flowcap: accounting memory per card",
        caption_size: 24,
        x_labels: 45,
        y_labels: 60,
    }
    .on(&root, text)
    .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..ymax)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("cards")
            .y_desc("bytes per card")
            .x_label_formatter(&|x| format!("{:.0}M", x / 1e6))
            .label_style(("sans-serif", 14))
            .draw()?;
    } else {
        chart.configure_mesh().draw()?;
    }
    chart.draw_series(LineSeries::new(
        [(xmin, 96.0), (xmax, 96.0)],
        RED.stroke_width(1),
    ))?;
    let series: [(&str, bool, bool, RGBColor); 4] = [
        ("RSS less command results, full cards", false, true, BLUE),
        ("accounting_heap_bytes, full cards", false, false, CYAN),
        ("RSS less command results, lean cards", true, true, GREEN),
        ("accounting_heap_bytes, lean cards", true, false, MAGENTA),
    ];
    for (label, lean, rss, color) in series {
        let data: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.lean == lean)
            .map(|p| (p.cards, if rss { p.rss_less_results } else { p.heap }))
            .collect();
        if data.is_empty() {
            continue;
        }
        let s = chart.draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))?;
        if text {
            s.label(label).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart.draw_series(
            data.iter()
                .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
        )?;
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    println!(
        "wrote {} ({} points; red line: 96 bytes/card goal)",
        output.display(),
        pts.len()
    );
    Ok(())
}
