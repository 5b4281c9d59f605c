//! Reward curves with a shaded confidence band, one panel per preference group, as SVG and
//! PNG (plotters).
//!
//! Text is measured and rasterised with DejaVu Sans, embedded through the `dejavu` crate and
//! handed to plotters' `ab_glyph` font backend: no system font or fontconfig is needed, so the
//! PNG renders the same on any machine. (The SVG names the font family `sans-serif`; viewers
//! substitute their own.)

use std::error::Error;
use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

/// One curve: a mean and a band (e.g. a 95% interval over seeds) at each x.
#[derive(Debug, Clone)]
pub struct Band {
    /// Legend entry.
    pub name: String,
    /// Palette index (the same estimator gets the same colour in every panel).
    pub color: usize,
    /// x values (steps).
    pub x: Vec<f64>,
    /// Mean at each x.
    pub mean: Vec<f64>,
    /// Lower edge of the band.
    pub lo: Vec<f64>,
    /// Upper edge of the band.
    pub hi: Vec<f64>,
}

/// One panel (one preference group).
#[derive(Debug, Clone)]
pub struct Panel {
    /// Caption.
    pub title: String,
    /// Curves.
    pub bands: Vec<Band>,
}

/// A grid of panels.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Title over the grid.
    pub title: String,
    /// Axis labels.
    pub x_label: String,
    /// Axis labels.
    pub y_label: String,
    /// Grid shape; `rows * cols >= panels.len()`.
    pub rows: usize,
    /// Grid shape.
    pub cols: usize,
    /// Panels, row-major.
    pub panels: Vec<Panel>,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),  // blue
    RGBColor(214, 39, 40),   // red
    RGBColor(44, 160, 44),   // green
    RGBColor(148, 103, 189), // purple
    RGBColor(255, 127, 14),  // orange
    RGBColor(127, 127, 127), // grey
];

const PANEL_W: u32 = 420;
const PANEL_H: u32 = 300;
const TITLE_H: u32 = 40;

fn register_font() {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        // The bytes are 'static (include_bytes! inside the dejavu crate).
        if plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_err()
        {
            eprintln!("warning: the embedded DejaVu Sans font did not load; plot text may fail");
        }
    });
}

impl Figure {
    fn size(&self) -> (u32, u32) {
        (
            PANEL_W * self.cols as u32,
            PANEL_H * self.rows as u32 + TITLE_H,
        )
    }

    /// Writes the figure as SVG.
    pub fn write_svg(&self, path: &Path) -> Result<(), Box<dyn Error>> {
        register_font();
        let root = SVGBackend::new(path, self.size()).into_drawing_area();
        self.draw(&root)?;
        root.present()?;
        Ok(())
    }

    /// Writes the figure as PNG.
    pub fn write_png(&self, path: &Path) -> Result<(), Box<dyn Error>> {
        register_font();
        let root = BitMapBackend::new(path, self.size()).into_drawing_area();
        self.draw(&root)?;
        root.present()?;
        Ok(())
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), Box<dyn Error>>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let body = root.titled(&self.title, ("sans-serif", 22))?;
        let cells = body.split_evenly((self.rows, self.cols));
        for (i, (panel, area)) in self.panels.iter().zip(cells.iter()).enumerate() {
            let (x0, x1, y0, y1) = panel.extent();
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 15))
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d(x0..x1, y0..y1)?;
            chart
                .configure_mesh()
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .x_labels(6)
                .y_labels(6)
                .label_style(("sans-serif", 12))
                .axis_desc_style(("sans-serif", 13))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .light_line_style(TRANSPARENT)
                .bold_line_style(RGBColor(225, 225, 225))
                .draw()?;
            for band in &panel.bands {
                let color = PALETTE[band.color % PALETTE.len()];
                let finite = |v: f64| v.is_finite();
                let upper = band
                    .x
                    .iter()
                    .zip(&band.hi)
                    .filter(|(_, y)| finite(**y))
                    .map(|(x, y)| (*x, *y));
                let lower = band
                    .x
                    .iter()
                    .zip(&band.lo)
                    .filter(|(_, y)| finite(**y))
                    .map(|(x, y)| (*x, *y))
                    .rev();
                let outline: Vec<(f64, f64)> = upper.chain(lower).collect();
                if outline.len() >= 3 {
                    chart.draw_series(std::iter::once(Polygon::new(
                        outline,
                        color.mix(0.18).filled(),
                    )))?;
                }
                let line = band
                    .x
                    .iter()
                    .zip(&band.mean)
                    .filter(|(_, y)| finite(**y))
                    .map(|(x, y)| (*x, *y));
                chart
                    .draw_series(LineSeries::new(line, color.stroke_width(2)))?
                    .label(band.name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
            }
            if i == 0 {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::LowerRight)
                    .label_font(("sans-serif", 12))
                    .background_style(WHITE.mix(0.85))
                    .border_style(RGBColor(200, 200, 200))
                    .draw()?;
            }
        }
        Ok(())
    }
}

impl Panel {
    /// x range, and a y range covering every band with a little margin.
    fn extent(&self) -> (f64, f64, f64, f64) {
        let xs = self.bands.iter().flat_map(|b| b.x.iter().copied());
        let (x0, x1) = min_max(xs).unwrap_or((0.0, 1.0));
        let ys = self
            .bands
            .iter()
            .flat_map(|b| b.lo.iter().chain(&b.hi).chain(&b.mean).copied());
        let (y0, y1) = min_max(ys).unwrap_or((0.0, 1.0));
        let pad = ((y1 - y0) * 0.05).max(1e-3);
        (x0, x1.max(x0 + 1.0), y0 - pad, y1 + pad)
    }
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// Mean and 95% band over runs, per step: `runs[r][step]`.
pub fn band_over_runs(name: &str, color: usize, steps: &[f64], runs: &[Vec<f64>]) -> Band {
    let mut b = Band {
        name: name.to_owned(),
        color,
        x: steps.to_vec(),
        mean: Vec::with_capacity(steps.len()),
        lo: Vec::with_capacity(steps.len()),
        hi: Vec::with_capacity(steps.len()),
    };
    for i in 0..steps.len() {
        let v: Vec<f64> = runs.iter().filter_map(|r| r.get(i).copied()).collect();
        let (m, ci) = super::mean_ci(&v);
        let ci = if ci.is_finite() { ci } else { 0.0 };
        b.mean.push(m);
        b.lo.push(m - ci);
        b.hi.push(m + ci);
    }
    b
}
