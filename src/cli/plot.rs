//! `sharedmoe plot RUN_DIR... [--out DIR] [--labels a,b]`: the train and
//! validation loss of runs, overlaid, as two PNGs (1200x800):
//! `loss_train.png` (cross-entropy per step, an EMA of 0.9 drawn over the
//! faint raw series) and `loss_val.png` (the validation points, connected).
//! Text is drawn with DejaVu Sans compiled into the binary
//! (`assets/fonts/`), so no system font is needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, RGBColor};

/// Size of both PNGs, in pixels.
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 800;
/// Weight of the previous value in the train-loss EMA.
pub const EMA: f64 = 0.9;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Tableau's 10 colours: one per run, in order (then again).
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// Run directories, each holding a metrics.jsonl.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Where loss_train.png and loss_val.png go (default: the first run directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Legend labels, comma-separated, one per run (default: the run directories' names).
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
}

pub fn run(args: &PlotArgs) -> Result<()> {
    let labels = match &args.labels {
        Some(l) if l.len() != args.runs.len() => bail!(
            "--labels has {} labels for {} run directories",
            l.len(),
            args.runs.len()
        ),
        Some(l) => l.clone(),
        None => args.runs.iter().map(|r| default_label(r)).collect(),
    };
    let runs = Curve::one_colour_each(labels.into_iter().zip(args.runs.clone()));
    let out = args.out.clone().unwrap_or_else(|| args.runs[0].clone());
    for p in plot_runs(&runs, &out)? {
        println!("{}", p.display());
    }
    Ok(())
}

/// A run's label when none is given: its directory's name.
pub fn default_label(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| {
            std::fs::canonicalize(dir)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| dir.display().to_string())
}

/// One run to draw: its legend label, its directory (holding
/// metrics.jsonl) and its colour, an index into [`PALETTE`]. Curves with
/// the same label share one legend entry: several seeds of one model are
/// drawn in the model's colour under one name.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    pub label: String,
    pub dir: PathBuf,
    pub colour: usize,
}

impl Curve {
    /// (label, directory) pairs, each run in the next colour.
    pub fn one_colour_each(runs: impl IntoIterator<Item = (String, PathBuf)>) -> Vec<Curve> {
        runs.into_iter()
            .enumerate()
            .map(|(colour, (label, dir))| Curve { label, dir, colour })
            .collect()
    }
}

/// The losses of one run, by step (a step logged twice keeps its last row).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RunLosses {
    pub train: Vec<(i64, f64)>,
    pub val: Vec<(i64, f64)>,
}

/// Reads `<dir>/metrics.jsonl`. Blank lines are skipped; a line that is not
/// a JSON object with an integer `step`, a numeric (or null) `loss` and, if
/// present, a numeric (or null) `val_loss` is an error naming the file and
/// line. Nulls and non-finite values are left out of the series.
pub fn read_losses(dir: &Path) -> Result<RunLosses> {
    let path = dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut train = BTreeMap::new();
    let mut val = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let Some(obj) = row.as_object() else {
            bail!("{}: not a JSON object", at());
        };
        let Some(step) = obj.get("step").and_then(|s| s.as_i64()) else {
            bail!("{}: no integer `step`", at());
        };
        let number = |key: &str, required: bool| -> Result<Option<f64>> {
            match obj.get(key) {
                None if required => bail!("{}: no `{key}`", at()),
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) => Ok(x.is_finite().then_some(x)),
                    None => bail!("{}: `{key}` is not a number: {v}", at()),
                },
            }
        };
        match number("loss", true)? {
            Some(x) => train.insert(step, x),
            None => train.remove(&step),
        };
        match number("val_loss", false)? {
            Some(x) => val.insert(step, x),
            None => val.remove(&step),
        };
    }
    Ok(RunLosses {
        train: train.into_iter().collect(),
        val: val.into_iter().collect(),
    })
}

/// Exponential moving average, starting at the first value:
/// s_0 = x_0, s_t = w * s_{t-1} + (1 - w) * x_t.
pub fn ema(values: &[(i64, f64)], w: f64) -> Vec<(i64, f64)> {
    let mut out = Vec::with_capacity(values.len());
    let mut s = None;
    for &(step, x) in values {
        let v = match s {
            None => x,
            Some(prev) => w * prev + (1.0 - w) * x,
        };
        s = Some(v);
        out.push((step, v));
    }
    out
}

/// Registers the bundled DejaVu Sans as "sans-serif" (once per process);
/// every plot of this crate calls it before drawing text.
pub fn register_fonts() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    if !*REGISTERED.get_or_init(|| register_font("sans-serif", FontStyle::Normal, FONT).is_ok()) {
        bail!("the bundled font assets/fonts/DejaVuSans.ttf does not parse");
    }
    Ok(())
}

/// (min, max) of `pick` over all points of all series; None when empty.
fn range<T: Copy + PartialOrd>(
    series: &[&[(i64, f64)]],
    pick: impl Fn((i64, f64)) -> T,
) -> Option<(T, T)> {
    let mut it = series.iter().flat_map(|s| s.iter().map(|&p| pick(p)));
    let first = it.next()?;
    Some(it.fold((first, first), |(lo, hi), v| {
        (if v < lo { v } else { lo }, if v > hi { v } else { hi })
    }))
}

/// Steps, padded by 2% (at least 1) so that end points are not cut, but
/// not below 0 when no step is.
fn x_range(series: &[&[(i64, f64)]]) -> std::ops::Range<i64> {
    match range(series, |p| p.0) {
        Some((lo, hi)) => {
            let pad = ((hi - lo) / 50).max(1);
            let start = if lo >= 0 { (lo - pad).max(0) } else { lo - pad };
            start..hi + pad
        }
        None => 0..1,
    }
}

/// Losses, padded by 5% (widened by 0.5 when flat).
fn y_range(series: &[&[(i64, f64)]]) -> std::ops::Range<f64> {
    match range(series, |p| p.1) {
        Some((lo, hi)) if hi > lo => {
            let pad = 0.05 * (hi - lo);
            lo - pad..hi + pad
        }
        Some((lo, _)) => lo - 0.5..lo + 0.5,
        None => 0.0..1.0,
    }
}

pub(super) fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

type Chart<'a> = ChartContext<
    'a,
    BitMapBackend<'a>,
    Cartesian2d<plotters::coord::types::RangedCoordi64, plotters::coord::types::RangedCoordf64>,
>;

fn chart<'a>(
    root: &DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
    title: &str,
    xs: std::ops::Range<i64>,
    ys: std::ops::Range<f64>,
) -> Result<Chart<'a>> {
    let mut c = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 32))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(90)
        .build_cartesian_2d(xs, ys)
        .map_err(|e| anyhow!("{e}"))?;
    c.configure_mesh()
        .x_desc("step")
        .y_desc("cross-entropy")
        .axis_desc_style(("sans-serif", 24))
        .label_style(("sans-serif", 18))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(210, 210, 210))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(c)
}

/// The legend box of a chart's labelled series, at `at`.
pub(super) fn legend<'a, X: Ranged, Y: Ranged>(
    c: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    at: SeriesLabelPosition,
) -> Result<()> {
    c.configure_series_labels()
        .position(at)
        .label_font(("sans-serif", 20))
        .legend_area_size(45)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .margin(15)
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

/// A curve's losses, and whether it carries its label's legend entry
/// (the first curve with that label does).
struct Drawn<'a> {
    curve: &'a Curve,
    losses: RunLosses,
    in_legend: bool,
}

fn plot_train(runs: &[Drawn], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let raw: Vec<&[(i64, f64)]> = runs.iter().map(|r| r.losses.train.as_slice()).collect();
    let mut c = chart(
        &root,
        &format!("Training loss (EMA {EMA}; raw values faint)"),
        x_range(&raw),
        y_range(&raw),
    )?;
    for r in runs {
        c.draw_series(LineSeries::new(
            r.losses.train.iter().copied(),
            colour(r.curve.colour).mix(0.3).stroke_width(1),
        ))
        .map_err(|e| anyhow!("{e}"))?;
    }
    for r in runs {
        let col = colour(r.curve.colour);
        let series = c
            .draw_series(LineSeries::new(
                ema(&r.losses.train, EMA),
                col.stroke_width(3),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        if r.in_legend {
            series.label(&r.curve.label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 30, y)], col.stroke_width(3))
            });
        }
    }
    legend(&mut c, SeriesLabelPosition::UpperRight)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn plot_val(runs: &[Drawn], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let val: Vec<&[(i64, f64)]> = runs.iter().map(|r| r.losses.val.as_slice()).collect();
    let mut c = chart(&root, "Validation loss", x_range(&val), y_range(&val))?;
    for r in runs {
        let col = colour(r.curve.colour);
        let points = &r.losses.val;
        let series = c
            .draw_series(LineSeries::new(points.iter().copied(), col.stroke_width(3)))
            .map_err(|e| anyhow!("{e}"))?;
        if r.in_legend {
            series.label(&r.curve.label).legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (30, 0)], col.stroke_width(3))
                    + Circle::new((15, 0), 5, col.filled())
            });
        }
        c.draw_series(points.iter().map(|&p| Circle::new(p, 5, col.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    if val.iter().all(|s| s.is_empty()) {
        root.draw_text(
            "no validation steps in these runs",
            &("sans-serif", 28)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Center)),
            (WIDTH as i32 / 2, HEIGHT as i32 / 2),
        )
        .map_err(|e| anyhow!("{e}"))?;
    }
    legend(&mut c, SeriesLabelPosition::UpperRight)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads every run's `metrics.jsonl` and writes `loss_train.png` and
/// `loss_val.png` (in that order; the paths are returned) into `out`,
/// creating it if needed.
pub fn plot_runs(runs: &[Curve], out: &Path) -> Result<Vec<PathBuf>> {
    if runs.is_empty() {
        bail!("no run directories to plot");
    }
    let losses = runs
        .iter()
        .enumerate()
        .map(|(i, curve)| {
            Ok(Drawn {
                curve,
                losses: read_losses(&curve.dir)?,
                in_legend: runs[..i].iter().all(|c| c.label != curve.label),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    register_fonts()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let train = out.join("loss_train.png");
    let val = out.join("loss_val.png");
    plot_train(&losses, &train)?;
    plot_val(&losses, &val)?;
    Ok(vec![train, val])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_starts_at_first_value() {
        let s = ema(&[(0, 10.0), (1, 0.0), (2, 0.0)], 0.9);
        assert_eq!(s[0], (0, 10.0));
        assert!((s[1].1 - 9.0).abs() < 1e-12);
        assert!((s[2].1 - 8.1).abs() < 1e-12);
        assert!(ema(&[], 0.9).is_empty());
    }

    #[test]
    fn ranges() {
        assert_eq!(x_range(&[]), 0..1);
        assert_eq!(x_range(&[&[(5, 1.0)]]), 4..6);
        assert_eq!(x_range(&[&[(5, 1.0)], &[(2, 1.0), (9, 3.0)]]), 1..10);
        assert_eq!(x_range(&[&[(0, 1.0), (500, 1.0)]]), 0..510);
        assert_eq!(x_range(&[&[(50, 1.0), (500, 1.0)]]), 41..509);
        let y = y_range(&[&[(0, 1.0), (1, 3.0)]]);
        assert!((y.start - 0.9).abs() < 1e-12 && (y.end - 3.1).abs() < 1e-12);
    }

    #[test]
    fn reads_rows_and_names_bad_lines() {
        let dir = std::env::temp_dir().join(format!("sharedmoe-plot-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("metrics.jsonl");
        std::fs::write(
            &f,
            "{\"step\":0,\"loss\":5.0,\"mfu\":null}\n\n\
             {\"step\":1,\"loss\":4.0,\"val_loss\":4.5}\n\
             {\"step\":2,\"loss\":null}\n\
             {\"step\":1,\"loss\":3.5,\"val_loss\":4.25}\n",
        )
        .unwrap();
        let r = read_losses(&dir).unwrap();
        assert_eq!(r.train, vec![(0, 5.0), (1, 3.5)]);
        assert_eq!(r.val, vec![(1, 4.25)]);

        for (body, want) in [
            ("{\"step\":0,\"loss\":1}\n{\"step\":1,", ":2: not JSON"),
            ("{\"loss\":1}\n", ":1: no integer `step`"),
            ("{\"step\":0}\n", ":1: no `loss`"),
            (
                "{\"step\":0,\"loss\":\"x\"}\n",
                ":1: `loss` is not a number",
            ),
            ("[1]\n", ":1: not a JSON object"),
        ] {
            std::fs::write(&f, body).unwrap();
            let e = format!("{:#}", read_losses(&dir).unwrap_err());
            assert!(e.contains(&format!("{}{want}", f.display())), "{e}");
        }
        std::fs::remove_file(&f).unwrap();
        let e = format!("{:#}", read_losses(&dir).unwrap_err());
        assert!(e.contains("metrics.jsonl"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
