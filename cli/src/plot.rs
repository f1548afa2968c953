//! `simulate --plot FILE`: the four variants side by side, drawn with
//! `plotters` as SVG or PNG (by the file's extension). Text is set in DejaVu
//! Sans embedded in the binary (the `dejavu` crate), so neither format needs a
//! system font, and the same run draws the same bytes on every machine.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Figure size, pixels (SVG user units).
pub const SIZE: (u32, u32) = (1280, 960);

/// One variant's series.
pub struct Series<'a> {
    /// Its name (legend).
    pub name: &'a str,
    /// Its colour, `(r, g, b)`.
    pub color: (u8, u8, u8),
    /// Successful upstream calls per simulated minute.
    pub ok_per_minute: &'a [u64],
    /// 429 responses per simulated minute.
    pub rejected_per_minute: &'a [u64],
    /// Requests left in the upstream's current window, one sample every
    /// [`Figure::sample_secs`] from the start.
    pub remaining: &'a [u64],
    /// Per tier (critical, standard, background): p50 and p95 wait, seconds.
    pub waits: [(Option<f64>, Option<f64>); 3],
}

/// Everything the figure shows.
pub struct Figure<'a> {
    /// The title line.
    pub title: String,
    /// Simulated minutes (the x axis of the time panels).
    pub minutes: u32,
    /// The upstream's quota per minute, drawn as a dashed line on panel (a).
    pub quota_per_minute: f64,
    /// The quota per window (top of panel (c)).
    pub quota_per_window: u64,
    /// Seconds between two samples of [`Series::remaining`].
    pub sample_secs: f64,
    /// The variants.
    pub variants: Vec<Series<'a>>,
}

/// The two formats, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.svg`
    Svg,
    /// `.png`
    Png,
}

impl Format {
    /// The format `path`'s extension names (`.svg` or `.png`, any case).
    ///
    /// # Errors
    /// Any other extension, or none.
    pub fn of(path: &Path) -> Result<Self, String> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("svg") => Ok(Self::Svg),
            Some("png") => Ok(Self::Png),
            _ => Err(format!(
                "{}: the plot's format follows the file's extension, `.png` or `.svg`",
                path.display()
            )),
        }
    }
}

const FONT: &str = "sans-serif";

/// Panel (c) shows the first minutes only: over a whole run, a sawtooth per
/// window is too dense to read.
const ZOOM_MINUTES: f64 = 6.0;

/// Registers the embedded font with plotters, once.
fn font() -> Result<(), String> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err("the embedded DejaVu Sans font could not be loaded".into())
    }
}

/// Draws `fig` into `path`, as SVG or PNG by its extension.
///
/// # Errors
/// A bad extension, a drawing failure, or a file that cannot be written
/// (each message names the file).
pub fn write(path: &Path, fig: &Figure<'_>) -> Result<(), String> {
    let format = Format::of(path)?;
    let bytes = render(format, fig)?;
    std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The figure's file contents in `format`.
///
/// # Errors
/// A drawing or encoding failure.
pub fn render(format: Format, fig: &Figure<'_>) -> Result<Vec<u8>, String> {
    font()?;
    let failed = |e: &dyn std::fmt::Display| format!("cannot draw the plot: {e}");
    match format {
        Format::Svg => {
            let mut s = String::new();
            {
                let root = SVGBackend::with_string(&mut s, SIZE).into_drawing_area();
                draw(&root, fig).map_err(|e| failed(&e))?;
                root.present().map_err(|e| failed(&e))?;
            }
            s.push('\n');
            Ok(s.into_bytes())
        }
        Format::Png => {
            let (w, h) = SIZE;
            let mut rgb = vec![0u8; w as usize * h as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
                draw(&root, fig).map_err(|e| failed(&e))?;
                root.present().map_err(|e| failed(&e))?;
            }
            let mut out = Vec::new();
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header().map_err(|e| failed(&e))?;
            writer.write_image_data(&rgb).map_err(|e| failed(&e))?;
            writer.finish().map_err(|e| failed(&e))?;
            Ok(out)
        }
    }
}

/// Which per-minute series of a variant a panel draws.
type PerMinute = for<'s> fn(&'s Series<'_>) -> &'s [u64];

type Drawn<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn rgb((r, g, b): (u8, u8, u8)) -> RGBColor {
    RGBColor(r, g, b)
}

/// Top of an axis: the largest value plus a tenth, at least `floor`.
fn top(values: impl Iterator<Item = u64>, floor: f64) -> f64 {
    (values.max().unwrap_or(0) as f64).max(floor).max(1.0) * 1.1
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, fig: &Figure<'_>) -> Drawn<DB> {
    root.fill(&WHITE)?;
    let root = root.titled(&fig.title, (FONT, 22))?;
    let panels = root.split_evenly((2, 2));
    let minutes = f64::from(fig.minutes.max(1));
    let per_minute: [(&str, &str, PerMinute); 2] = [
        (
            "(a) successful upstream calls per minute",
            "successes / min",
            |s| s.ok_per_minute,
        ),
        ("(b) 429 responses per minute", "429s / min", |s| {
            s.rejected_per_minute
        }),
    ];
    for (i, (panel, (caption, y_desc, series))) in panels.iter().zip(per_minute).enumerate() {
        let successes = i == 0;
        let ymax = top(
            fig.variants.iter().flat_map(|v| series(v).iter().copied()),
            if successes { fig.quota_per_minute } else { 0.0 },
        );
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, (FONT, 17))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..minutes, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("simulated minute")
            .y_desc(y_desc)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE)
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .draw()?;
        if successes {
            let q = fig.quota_per_minute;
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, q), (minutes, q)],
                    6,
                    4,
                    RGBColor(120, 120, 120).stroke_width(1),
                ))?
                .label(format!("quota {q}/min"))
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], RGBColor(120, 120, 120))
                });
        }
        for v in &fig.variants {
            let color = rgb(v.color);
            chart
                .draw_series(LineSeries::new(
                    series(v)
                        .iter()
                        .enumerate()
                        .map(|(k, n)| (k as f64 + 0.5, *n as f64)),
                    color.stroke_width(2),
                ))?
                .label(v.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        legend(&mut chart)?;
    }
    remaining_panel(&panels[2], fig, minutes)?;
    latency_panel(&panels[3], fig)?;
    Ok(())
}

fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Drawn<DB> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .label_font((FONT, 12))
        .draw()
}

fn remaining_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    fig: &Figure<'_>,
    minutes: f64,
) -> Drawn<DB> {
    let shown = minutes.min(ZOOM_MINUTES);
    let ymax = top(
        fig.variants
            .iter()
            .flat_map(|v| v.remaining.iter().copied()),
        fig.quota_per_window as f64,
    );
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("(c) quota remaining in the upstream's window, first {shown} minutes"),
            (FONT, 17),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..shown, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("simulated minute")
        .y_desc("requests remaining")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .draw()?;
    for v in &fig.variants {
        let color = rgb(v.color);
        chart
            .draw_series(LineSeries::new(
                v.remaining
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (i as f64 * fig.sample_secs / 60.0, *n as f64))
                    .take_while(|(x, _)| *x <= shown),
                color.stroke_width(2),
            ))?
            .label(v.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart)
}

/// Per tier, one bar per variant: the p95 wait pale, the p50 solid inside it
/// (log scale: seconds to many minutes on one axis).
fn latency_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, fig: &Figure<'_>) -> Drawn<DB> {
    const FLOOR: f64 = 0.1;
    let longest = fig
        .variants
        .iter()
        .flat_map(|v| v.waits.iter().filter_map(|w| w.1))
        .fold(10.0f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "(d) wait per tier: p50 (solid), p95 (pale, in figures), seconds",
            (FONT, 17),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..3f64, (FLOOR / 5.0..longest * 40.0).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(4)
        .x_label_formatter(&|_| String::new())
        .x_desc("tier")
        .y_labels(8)
        .y_label_formatter(&|v| {
            if *v < FLOOR {
                String::new()
            } else {
                format!("{v}")
            }
        })
        .y_desc("wait, s (log)")
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .draw()?;
    // Tier names in the strip under the bars (which start at FLOOR).
    for (t, tier) in ["critical (P0)", "standard (P1)", "background (P2)"]
        .into_iter()
        .enumerate()
    {
        chart.draw_series([Text::new(
            tier,
            (t as f64 + 0.5, FLOOR / 2.0),
            TextStyle::from((FONT, 13)).pos(Pos::new(HPos::Center, VPos::Center)),
        )])?;
    }
    let n = fig.variants.len().max(1) as f64;
    let width = 0.8 / n;
    for (i, v) in fig.variants.iter().enumerate() {
        let color = rgb(v.color);
        for (t, (p50, p95)) in v.waits.iter().enumerate() {
            let x0 = t as f64 + 0.1 + width * i as f64;
            let x1 = x0 + width * 0.9;
            if let Some(p95) = p95 {
                chart.draw_series([Rectangle::new(
                    [(x0, FLOOR), (x1, p95.max(FLOOR))],
                    color.mix(0.35).filled(),
                )])?;
            }
            if let Some(p50) = p50 {
                chart.draw_series([Rectangle::new(
                    [(x0, FLOOR), (x1, p50.max(FLOOR))],
                    color.filled(),
                )])?;
            }
            // The p95 in figures above the bar: a wait near zero has no bar to see.
            if let Some(p95) = p95 {
                chart.draw_series([Text::new(
                    if *p95 < 10.0 {
                        format!("{p95:.1}")
                    } else {
                        format!("{p95:.0}")
                    },
                    ((x0 + x1) / 2.0, p95.max(FLOOR) * 1.08),
                    TextStyle::from((FONT, 10)).pos(Pos::new(HPos::Center, VPos::Bottom)),
                )])?;
            }
        }
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
            .label(v.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .label_font((FONT, 12))
        .draw()
}
