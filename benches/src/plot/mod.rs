//! Every chart the three report binaries draw (`engine_report`,
//! `kafka_report`, `sql_report`), in one place: one font, one error type,
//! one line chart.
//!
//! Each chart is drawn from what its report measured (JSON lines or the
//! report's own figures), never from a measurement of its own, and goes to
//! a fixed, undated file name: drawing it again into `docs/img` replaces
//! the picture docs/BENCHMARKS.md shows, so the docs keep one picture per
//! chart and its history is git's.

pub mod engine;
pub mod kafka;
pub mod sql;

use std::path::{Path, PathBuf};

use plotters::prelude::*;

/// The TrueType font the report plots write their text with.
pub const PLOT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Why a chart was not drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The measurements to draw could not be read.
    #[error("reading {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The output directory could not be made.
    #[error("creating {}: {error}", path.display())]
    Create {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The input holds nothing this chart draws.
    #[error("no measurements in {}", .0.display())]
    Empty(PathBuf),
    /// [`PLOT_FONT`] is there but not usable.
    #[error("font {PLOT_FONT} not usable")]
    Font,
    /// plotters failed to draw or to write the picture.
    #[error("drawing: {0}")]
    Draw(String),
}

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for PlotError {
    fn from(e: DrawingAreaErrorKind<E>) -> PlotError {
        PlotError::Draw(e.to_string())
    }
}

/// Registers [`PLOT_FONT`] as plotters' `sans-serif`. `false` when the file
/// is missing (the plots are then drawn without text); an error when it is
/// there but not usable.
pub fn register_font() -> Result<bool, PlotError> {
    match std::fs::read(PLOT_FONT) {
        Ok(bytes) => {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
                .map_err(|_| PlotError::Font)?;
            Ok(true)
        }
        Err(_) => Ok(false),
    }
}

/// How a chart frames its plot: the margin, and, when it has labels, the
/// caption (its text and size) and the room for each axis's labels.
struct Frame<'c> {
    margin: u32,
    caption: &'c str,
    caption_size: u32,
    x_labels: u32,
    y_labels: u32,
}

impl Frame<'_> {
    /// A builder on `root` framed so (the caption and label areas only
    /// with `labels`: without a font there is no text).
    fn on<'a, 'b, DB: DrawingBackend>(
        &self,
        root: &'a DrawingArea<DB, plotters::coord::Shift>,
        labels: bool,
    ) -> ChartBuilder<'a, 'b, DB> {
        let mut builder = ChartBuilder::on(root);
        builder.margin(self.margin);
        if labels {
            builder
                .caption(self.caption, ("sans-serif", self.caption_size).into_font())
                .x_label_area_size(self.x_labels)
                .y_label_area_size(self.y_labels);
        }
        builder
    }
}

/// Lines of their own colors over `x_desc`, and a blue horizontal
/// `reference` line.
struct LineChart {
    caption: &'static str,
    x_desc: &'static str,
    y_desc: &'static str,
    reference: Option<f64>,
}

impl LineChart {
    fn draw(
        &self,
        series: &[(RGBColor, Vec<(f64, f64)>)],
        path: &Path,
        labels: bool,
    ) -> Result<(), PlotError> {
        let points = || series.iter().flat_map(|(_, s)| s.iter());
        let xmin = points().map(|p| p.0).fold(0.0f64, f64::min);
        let xmax = points().map(|p| p.0).fold(1.0f64, f64::max);
        let ymax = points()
            .map(|p| p.1)
            .fold(self.reference.unwrap_or(0.0), f64::max)
            * 1.1;
        let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = Frame {
            margin: 20,
            caption: self.caption,
            caption_size: 16,
            x_labels: 35,
            y_labels: 60,
        }
        .on(&root, labels)
        .build_cartesian_2d(xmin..xmax, 0.0..ymax.max(1.0))?;
        if labels {
            chart
                .configure_mesh()
                .x_desc(self.x_desc)
                .y_desc(self.y_desc)
                .label_style(("sans-serif", 13))
                .draw()?;
        }
        for (color, s) in series {
            chart.draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(1)))?;
        }
        if let Some(y) = self.reference {
            chart.draw_series(LineSeries::new(
                [(xmin, y), (xmax, y)],
                BLUE.stroke_width(2),
            ))?;
        }
        root.present()?;
        Ok(())
    }
}
