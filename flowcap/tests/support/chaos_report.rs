//! The chaos suite's report: `report.md` with each scenario's scale,
//! duration and checks, and one plot per scenario (input position and
//! newest snapshot over time above, resident set below, kills and broker
//! restarts marked), in `target/chaos/` (`CHAOS_REPORT_DIR`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use plotters::prelude::*;

use crate::kit::{Checks, Timeline};

/// One scenario's outcome.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// File-name stem (`kill_9_loop`): the plot is `chaos_<name>.png`.
    pub(crate) name: &'static str,
    pub(crate) title: &'static str,
    /// (what, how much) of the scale run.
    pub(crate) scale: Vec<(String, String)>,
    pub(crate) seconds: f64,
    pub(crate) checks: Option<Checks>,
    pub(crate) timeline: Timeline,
    /// Figures measured beside the checks.
    pub(crate) notes: Vec<String>,
    /// The panic that ended the scenario early, if one did.
    pub(crate) error: Option<String>,
}

impl Outcome {
    pub(crate) fn failures(&self) -> Vec<String> {
        let mut out: Vec<String> = self.error.iter().cloned().collect();
        match &self.checks {
            Some(c) => out.extend(c.failures()),
            None if self.error.is_none() => out.push("not checked".into()),
            None => {}
        }
        out
    }
}

/// Where the report goes.
pub(crate) fn dir() -> PathBuf {
    std::env::var_os("CHAOS_REPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .unwrap()
                .join("chaos")
        })
}

/// Writes `file` (e.g. `report.md`) and the outcomes' plots into [`dir`];
/// the report's path.
pub(crate) fn write(outcomes: &[Outcome], file: &str) -> PathBuf {
    let dir = dir();
    std::fs::create_dir_all(&dir).unwrap();
    let labels = register_font();
    let mut md = String::new();
    let _ = writeln!(md, "# Chaos suite report\n");
    let _ = writeln!(
        md,
        "Command: `cargo test{} --workspace --locked --test chaos -- --ignored --nocapture \
         --test-threads 1`\n",
        if cfg!(debug_assertions) {
            ""
        } else {
            " --release"
        }
    );
    let _ = writeln!(md, "- date: {}", shell("date -u '+%Y-%m-%d %H:%M UTC'"));
    let _ = writeln!(md, "- commit: {}", shell("git rev-parse --short HEAD"));
    let _ = writeln!(
        md,
        "- machine: {} cores ({}), {} memory",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        shell("awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo"),
        shell("awk '/MemTotal/ {printf \"%.0f GiB\", $2 / 1048576}' /proc/meminfo")
    );
    let _ = writeln!(
        md,
        "- build: {}\n",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let _ = writeln!(md, "| scenario | scale | duration | result |");
    let _ = writeln!(md, "| --- | --- | --- | --- |");
    for o in outcomes {
        let scale: Vec<String> = o.scale.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let failures = o.failures();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            o.title,
            scale.join(", "),
            duration(o.seconds),
            if failures.is_empty() {
                "passed".to_owned()
            } else {
                format!("**failed** ({})", failures.len())
            }
        );
    }
    for o in outcomes {
        let _ = writeln!(md, "\n## {}\n", o.title);
        for (k, v) in &o.scale {
            let _ = writeln!(md, "- {k}: {v}");
        }
        let _ = writeln!(md, "- duration: {}", duration(o.seconds));
        if let Some(e) = &o.error {
            let _ = writeln!(md, "- **ended early**: {}", e.replace('\n', " "));
        }
        if let Some(c) = &o.checks {
            let _ = writeln!(md, "\n| check | figure | |\n| --- | --- | --- |");
            let mut row = |what: &str, figure: String, ok: Option<bool>| {
                let mark = match ok {
                    Some(true) => "ok",
                    Some(false) => "**FAILED**",
                    None => "measured",
                };
                let _ = writeln!(md, "| {what} | {figure} | {mark} |");
            };
            row(
                "(card, cycle) totals equal to the generator's",
                format!("{} of {} differ", c.mismatched, c.card_cycles),
                Some(c.mismatched == 0),
            );
            row(
                "record ids more than once in the history",
                format!("{} (of {} rows)", c.duplicate_ids, c.history_rows),
                Some(c.duplicate_ids == 0),
            );
            row(
                "expected cuts present (uninterrupted reference run)",
                format!(
                    "{} of {} missing ({} besides)",
                    c.cuts_missing_count, c.cuts_expected, c.cuts_extra
                ),
                Some(c.cuts_missing_count == 0),
            );
            row(
                "actions topic = final decisions",
                match &c.actions {
                    Ok(n) => format!("{n} messages"),
                    Err(e) => e.clone(),
                },
                Some(c.actions.is_ok()),
            );
            row(
                "dead letters (bad records the generator made)",
                format!(
                    "{} messages for {} distinct inputs; {} bad records",
                    c.dlq_messages, c.dlq_inputs, c.dlq_expected
                ),
                c.assert_dlq.then_some(c.dlq_messages == c.dlq_expected),
            );
            for (what, ok, figure) in &c.extra {
                row(what, figure.clone(), Some(*ok));
            }
            for (what, figure) in &c.measured {
                row(what, figure.clone(), None);
            }
        }
        for n in &o.notes {
            let _ = writeln!(md, "\n{n}");
        }
        let plot = format!("chaos_{}.png", o.name);
        match plot_timeline(&o.timeline, o.title, &dir.join(&plot), labels) {
            Ok(()) => {
                let _ = writeln!(md, "\n![{}]({plot})", o.title);
            }
            Err(e) => {
                let _ = writeln!(md, "\n(plot failed: {e})");
            }
        }
        for f in o.failures() {
            let _ = writeln!(md, "\n- failure: {}", f.replace('\n', " "));
        }
    }
    let path = dir.join(file);
    std::fs::write(&path, md).unwrap();
    eprintln!("report: {}", path.display());
    path
}

fn shell(script: &str) -> String {
    Command::new("sh")
        .args(["-c", script])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn duration(secs: f64) -> String {
    if secs >= 90.0 {
        format!("{:.0} min {:.0} s", (secs / 60.0).floor(), secs % 60.0)
    } else {
        format!("{secs:.0} s")
    }
}

/// A line of a plot: its colour, legend and points.
type Series<'a> = (RGBColor, &'a str, Vec<(f64, f64)>);

/// Input position and newest snapshot (millions) above, resident set
/// (MiB) below, over seconds; marks as vertical lines (red: kill -9,
/// blue: broker restart, grey: anything else).
fn plot_timeline(
    timeline: &Timeline,
    title: &str,
    path: &Path,
    labels: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let samples = &timeline.samples;
    let xmax = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let millions = |v: u64| v as f64 / 1e6;
    let ymax = samples
        .iter()
        .flat_map(|s| [s.position, s.snapshot, s.produced])
        .flatten()
        .map(millions)
        .fold(0.0, f64::max)
        * 1.1;
    let rss_max = samples.iter().filter_map(|s| s.rss_mib).fold(0.0, f64::max) * 1.1;
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(400);
    let mark_color = |what: &str| {
        if what.starts_with("kill") {
            RED
        } else if what.contains("broker") {
            BLUE
        } else {
            RGBColor(128, 128, 128)
        }
    };
    let draw = |area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
                caption: String,
                y_desc: &str,
                ytop: f64,
                series: Vec<Series<'_>>|
     -> Result<(), Box<dyn std::error::Error>> {
        let top = if ytop > 0.0 { ytop } else { 1.0 };
        let mut builder = ChartBuilder::on(area);
        builder.margin(15);
        if labels {
            builder
                .caption(caption, ("sans-serif", 16).into_font())
                .x_label_area_size(30)
                .y_label_area_size(60);
        }
        let mut chart = builder.build_cartesian_2d(0.0..xmax, 0.0..top)?;
        if labels {
            chart
                .configure_mesh()
                .x_desc("seconds")
                .y_desc(y_desc)
                .label_style(("sans-serif", 12))
                .draw()?;
        }
        for (t, what) in &timeline.marks {
            chart.draw_series(LineSeries::new(
                [(*t, 0.0), (*t, top)],
                mark_color(what).mix(0.6).stroke_width(1),
            ))?;
        }
        for (color, name, data) in series {
            if data.is_empty() {
                continue;
            }
            let s = chart.draw_series(LineSeries::new(data, color.stroke_width(2)))?;
            if labels {
                s.label(name).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
        }
        if labels {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .draw()?;
        }
        Ok(())
    };
    let points = |f: &dyn Fn(&crate::kit::Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        samples.iter().filter_map(|s| Some((s.t, f(s)?))).collect()
    };
    draw(
        &top,
        format!("{title}: input position (red: kill -9, blue: broker restart)"),
        "million inputs",
        ymax,
        vec![
            (
                RGBColor(230, 140, 0),
                "records produced",
                points(&|s| s.produced.map(millions)),
            ),
            (
                RGBColor(0, 0, 200),
                "position of the running process",
                points(&|s| s.position.map(millions)),
            ),
            (
                RGBColor(0, 150, 0),
                "newest snapshot",
                points(&|s| s.snapshot.map(millions)),
            ),
        ],
    )?;
    draw(
        &bottom,
        "resident set of flowcap".to_owned(),
        "MiB",
        rss_max,
        vec![(BLACK, "VmRSS", points(&|s| s.rss_mib))],
    )?;
    root.present()?;
    Ok(())
}

/// Registers the plots' font (the one the benchmark reports use) as
/// plotters' `sans-serif`; `false` when it is missing (plots without
/// text). Not taken from the benches crate: the binary's tests do not
/// depend on it (ARCHITECTURE, *Crates*).
fn register_font() -> bool {
    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    match std::fs::read(FONT) {
        Ok(bytes) => {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
                .is_ok()
        }
        Err(_) => false,
    }
}
