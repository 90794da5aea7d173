//! `sharedmoe experts --ckpt D [--data P... --tokenizer T] [--batches N]
//! [--out DIR]`: which experts the routers pick at each layer of an MoE
//! checkpoint, on the rows `eval` scores (the run's validation batches, or
//! every document of `--data`). For a shared-MoE model that is the ONE
//! router over the shared experts at every layer; for a per-layer MoE
//! (`ffn = "moe"`, Qwen3-MoE) each MoE layer's own router over its own
//! experts.
//!
//! The routers run inside a compiled program over the training forward
//! (`model::routing`); counting happens on the host. Writes into `--out`
//! (default: the run directory's `experts/`):
//! - `expert_counts.csv`: layer (the model layer, from 0), expert, count
//!   (tokens that chose the expert there), fraction (count / tokens; a
//!   layer's fractions sum to k), mass (mean routing weight; a layer's
//!   masses sum to 1 where the top-k weights are renormalised);
//! - `expert_heatmap.png` (layers x E, fraction of tokens);
//! - shared pool only (expert e of two layers is one expert there):
//!   `layer_overlap.csv`: layer_a, layer_b, overlap (share of tokens whose
//!   top-k sets at a and b intersect), jaccard (mean Jaccard index of the
//!   sets), overlap_other_token (the same between a token at a and another
//!   token at b: what the layers' expert usage alone gives); and
//!   `layer_overlap.png` (L x L, overlap);
//!
//! and prints the most-used experts per layer, how many experts each layer
//! uses, and for a shared pool the overlap of layers 3 and 10 (the thesis
//! claims they choose the same experts).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

use crate::ckpt;
use crate::model::routing::{
    choices_from_outputs, routed_layers, routing_program, uniform_overlap, ExpertPool, RoutingStats,
};
use crate::model::FfnKind;
use crate::train::Config;

use super::eval::{run_over_rows, CheckpointRows};
use super::plot::register_fonts;

#[derive(clap::Args, Debug)]
pub struct ExpertsArgs {
    /// The checkpoint (of an MoE model) and the rows to route.
    #[command(flatten)]
    pub rows: CheckpointRows,
    /// Output directory (default: the run directory's `experts/`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: &ExpertsArgs) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| default_out(&a.rows.ckpt));
    let analysis = analyse(&a.rows, &out)?;
    print!("{}", summary(&analysis.stats, analysis.batches));
    for f in analysis.files {
        println!("{}", f.display());
    }
    Ok(())
}

/// What [`analyse`] found and wrote.
pub struct Analysis {
    pub stats: RoutingStats,
    /// Batches routed.
    pub batches: usize,
    /// The CSVs and PNGs of [`write_outputs`], in its order.
    pub files: Vec<PathBuf>,
}

/// Routes `rows` through the checkpoint's routers and writes the CSVs
/// and plots into `out`.
pub fn analyse(rows: &CheckpointRows, out: &Path) -> Result<Analysis> {
    let mut cfg = rows.config()?;
    if cfg.model.ffn == FfnKind::Dense {
        bail!(
            "{}: model.ffn = \"dense\"; `experts` analyses MoE checkpoints (shared-MoE or \
             per-layer MoE), and a dense model has no experts",
            rows.ckpt.display()
        );
    }
    let (checkpoint, batches) = rows.load(&mut cfg)?;
    let stats = route(&cfg, &checkpoint, &batches, rows.plugin.as_deref())?;
    let files = write_outputs(&stats, out)?;
    Ok(Analysis {
        stats,
        batches: batches.len(),
        files,
    })
}

/// `RUN/experts` for a checkpoint `RUN/checkpoints/step_N`, else `D/experts`.
fn default_out(ckpt: &Path) -> PathBuf {
    match ckpt.parent() {
        Some(p) if p.file_name().is_some_and(|n| n == "checkpoints") => {
            p.parent().unwrap_or(Path::new(".")).join("experts")
        }
        _ => ckpt.join("experts"),
    }
}

/// Runs the routing program over every row group of `batches` (one
/// micro-batch per call, on one device) and accumulates the statistics.
fn route(
    cfg: &Config,
    checkpoint: &ckpt::Checkpoint,
    batches: &[Vec<Vec<i32>>],
    plugin: Option<&Path>,
) -> Result<RoutingStats> {
    let (m, t) = (&cfg.model, &cfg.train);
    let program = routing_program(m, cfg.compute_dtype(), t.micro_batch, t.seq_len, false)?;
    let (e, k) = (m.num_experts as usize, m.experts_per_token as usize);
    let layers: Vec<usize> = routed_layers(m).into_iter().map(|l| l as usize).collect();
    let mut stats = match m.ffn {
        FfnKind::SharedMoe | FfnKind::PooledMoe => RoutingStats::shared_at(layers, e, k),
        FfnKind::Moe | FfnKind::Dense => RoutingStats::per_layer(layers, e, k),
    };
    run_over_rows(cfg, checkpoint, batches, plugin, program, |outs| {
        stats
            .add(&choices_from_outputs(&outs, false))
            .map_err(|e| anyhow!("routing program results: {e}"))
    })?;
    Ok(stats)
}

/// Writes the CSVs and PNGs into `out` (created if needed): the counts
/// and their heatmap, then for a shared pool the overlap CSV and plot;
/// returns their paths in that order.
pub fn write_outputs(s: &RoutingStats, out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (big_l, e) = (s.layers, s.experts);
    let counts = out.join("expert_counts.csv");
    let mut text = String::from("layer,expert,count,fraction,mass\n");
    for (l, layer) in s.layer_ids.iter().enumerate() {
        for x in 0..e {
            text += &format!(
                "{layer},{x},{},{:.6},{:.6}\n",
                s.counts[l][x],
                s.fraction(l, x),
                s.mass(l, x)
            );
        }
    }
    write(&counts, &text)?;
    register_fonts()?;
    let fractions: Vec<Vec<f64>> = (0..big_l)
        .map(|l| (0..e).map(|x| s.fraction(l, x)).collect())
        .collect();
    let top = fractions.iter().flatten().fold(0.0f64, |m, &v| m.max(v));
    let heatmap = out.join("expert_heatmap.png");
    let whose = match s.pool {
        ExpertPool::Shared => "",
        ExpertPool::PerLayer => " (each layer its own)",
    };
    draw_heatmap(
        &heatmap,
        &Heatmap {
            title: format!(
                "Share of tokens routed to each expert{whose}, per layer (top-{} of {e}, {} tokens)",
                s.k, s.tokens
            ),
            x_desc: "expert",
            y_desc: "layer",
            bar_desc: "fraction of tokens",
            values: &fractions,
            row_names: &s.layer_ids,
            col_names: &[],
            range: (0.0, if top > 0.0 { top } else { 1.0 }),
        },
    )?;
    let mut files = vec![counts, heatmap];
    let Some(o) = s.layer_overlap() else {
        return Ok(files);
    };
    let overlap = out.join("layer_overlap.csv");
    let mut text = String::from("layer_a,layer_b,overlap,jaccard,overlap_other_token\n");
    for a in 0..big_l {
        for b in 0..big_l {
            text += &format!(
                "{},{},{:.6},{:.6},{:.6}\n",
                s.layer_ids[a],
                s.layer_ids[b],
                o.overlap(a, b),
                o.jaccard(a, b),
                o.overlap_other_token(a, b)
            );
        }
    }
    write(&overlap, &text)?;
    let overlaps: Vec<Vec<f64>> = (0..big_l)
        .map(|a| (0..big_l).map(|b| o.overlap(a, b)).collect())
        .collect();
    let overlap_png = out.join("layer_overlap.png");
    draw_heatmap(
        &overlap_png,
        &Heatmap {
            title: format!(
                "Tokens whose top-{} experts at two layers intersect (uniform routing: {:.2})",
                s.k,
                uniform_overlap(e, s.k)
            ),
            x_desc: "layer",
            y_desc: "layer",
            bar_desc: "fraction of tokens",
            values: &overlaps,
            row_names: &s.layer_ids,
            col_names: &s.layer_ids,
            range: (0.0, 1.0),
        },
    )?;
    files.extend([overlap, overlap_png]);
    Ok(files)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

/// The printed report: most-used experts per layer and how many experts
/// each layer uses; for a shared pool also the routing mass over all
/// layers, the mean overlap between layers and that of layers 3 and 10.
pub fn summary(s: &RoutingStats, batches: usize) -> String {
    let (e, k) = (s.experts, s.k);
    let pool = match s.pool {
        ExpertPool::Shared => format!("{} layers sharing {e} experts", s.layers),
        ExpertPool::PerLayer => format!(
            "{} MoE layers with {e} experts each (each layer its own router)",
            s.layers
        ),
    };
    let mut o = format!(
        "{} tokens ({batches} batches) through {pool}, top-{k}\n\
         most used experts per layer (share of tokens; a layer's shares sum to {k}); \
         effective experts = exp(entropy of the layer's choice shares), {e} if uniform:\n",
        s.tokens
    );
    for (l, layer) in s.layer_ids.iter().enumerate() {
        let ranked = s.ranked(l);
        let top: Vec<String> = ranked
            .iter()
            .take(3)
            .map(|&x| format!("e{x} {:.1}%", 100.0 * s.fraction(l, x)))
            .collect();
        let least = ranked[e - 1];
        o += &format!(
            "  layer {layer:>2}: {}   (least: e{least} {:.1}%; effective {:.1})\n",
            top.join(", "),
            100.0 * s.fraction(l, least),
            s.effective_experts(l)
        );
    }
    let Some(overlap) = s.layer_overlap() else {
        return o;
    };
    let mut by_mass: Vec<usize> = (0..e).collect();
    by_mass.sort_by(|&a, &b| s.overall_mass(b).total_cmp(&s.overall_mass(a)));
    let mass: Vec<String> = by_mass
        .iter()
        .map(|&x| format!("e{x} {:.3}", s.overall_mass(x)))
        .collect();
    o += &format!(
        "routing mass over all layers (sums to 1): {}\n",
        mass.join(", ")
    );
    let chance = uniform_overlap(e, k);
    if let Some(mean) = overlap.between_layers() {
        o += &format!(
            "two different layers share an expert for {:.1}% of tokens on average (mean Jaccard \
             {:.3}); a token against another token: {:.1}%; uniform random routing: {:.1}%\n",
            100.0 * mean.overlap,
            mean.jaccard,
            100.0 * mean.other_token,
            100.0 * chance
        );
    }
    let pair = |a: usize, b: usize, name: &str| {
        format!(
            "layers {a} and {b} ({name}): {:.1}% of tokens share an expert (mean Jaccard {:.3}; \
             a token against another token: {:.1}%; uniform random routing: {:.1}%)\n",
            100.0 * overlap.overlap(a, b),
            overlap.jaccard(a, b),
            100.0 * overlap.overlap_other_token(a, b),
            100.0 * chance
        )
    };
    let big_l = s.layers;
    if big_l > 10 {
        o += &pair(3, 10, "counted from 0, as in the CSVs and plots");
        o += &pair(2, 9, "the thesis's layers 3 and 10 if it counts from 1");
    } else {
        o += &format!(
            "layers 3 and 10 (the thesis's claim): this model has only {big_l} layers (0..{})\n",
            big_l - 1
        );
    }
    o
}

/// A matrix to draw: `values[row][col]`, row 0 at the top.
pub(super) struct Heatmap<'a> {
    pub title: String,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub bar_desc: &'a str,
    pub values: &'a [Vec<f64>],
    /// The label of each row (the model layer it shows).
    pub row_names: &'a [usize],
    /// The label of each column; empty: its index.
    pub col_names: &'a [usize],
    /// Values mapped to the ends of the colour scale.
    pub range: (f64, f64),
}

/// Size of the heatmap PNGs, in pixels.
pub const WIDTH: u32 = 1400;
pub const HEIGHT: u32 = 900;

/// Viridis, sampled at 0, 1/4, 1/2, 3/4, 1.
const VIRIDIS: [(f64, f64, f64); 5] = [
    (68.0, 1.0, 84.0),
    (59.0, 82.0, 139.0),
    (33.0, 145.0, 140.0),
    (94.0, 201.0, 98.0),
    (253.0, 231.0, 37.0),
];

/// The colour of t in [0, 1] (clamped), interpolated linearly.
fn viridis(t: f64) -> RGBColor {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (VIRIDIS.len() - 1) as f64;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    let mix = |p: f64, q: f64| (p + f * (q - p)).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Draws the matrix as coloured cells (with their values when the cells
/// are large enough), row and column indices, axis names, a title and a
/// colour bar, laid out by hand in pixels.
pub(super) fn draw_heatmap(path: &Path, h: &Heatmap) -> Result<()> {
    let rows = h.values.len();
    let cols = h.values.first().map_or(0, Vec::len);
    if rows == 0 || cols == 0 {
        bail!("nothing to draw in {}", path.display());
    }
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let e = |err| anyhow!("drawing {}: {err}", path.display());
    root.fill(&WHITE).map_err(e)?;
    let (w, hh) = (WIDTH as i32, HEIGHT as i32);
    let (left, top, right, bottom) = (120, 80, w - 230, hh - 110);
    let centred = |size: f64| {
        ("sans-serif", size)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center))
    };
    root.draw_text(&h.title, &centred(26.0), (w / 2, 36))
        .map_err(e)?;
    let x_at = |c: usize| left + ((right - left) as f64 * c as f64 / cols as f64).round() as i32;
    let y_at = |r: usize| top + ((bottom - top) as f64 * r as f64 / rows as f64).round() as i32;
    let (lo, hi) = h.range;
    let scale = |v: f64| (v - lo) / (hi - lo);
    let (cell_w, cell_h) = (x_at(1) - x_at(0), y_at(1) - y_at(0));
    let number_size = (cell_h as f64 * 0.4).min(cell_w as f64 * 0.27).min(20.0);
    for (r, row) in h.values.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let (x0, y0, x1, y1) = (x_at(c), y_at(r), x_at(c + 1), y_at(r + 1));
            root.draw(&Rectangle::new(
                [(x0, y0), (x1, y1)],
                viridis(scale(v)).filled(),
            ))
            .map_err(e)?;
            if number_size >= 9.0 {
                let ink = if scale(v) > 0.6 { BLACK } else { WHITE };
                let style = ("sans-serif", number_size)
                    .into_font()
                    .color(&ink)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                root.draw_text(&format!("{v:.2}"), &style, ((x0 + x1) / 2, (y0 + y1) / 2))
                    .map_err(e)?;
            }
        }
    }
    root.draw(&Rectangle::new([(left, top), (right, bottom)], BLACK))
        .map_err(e)?;
    // Indices: every column/row when they fit, else every n-th.
    let label_size = 18.0;
    let every = |n: usize, px: i32| ((n as f64 * 24.0 / px as f64).ceil() as usize).max(1);
    let col_step = every(cols, right - left);
    for c in (0..cols).step_by(col_step) {
        let x = (x_at(c) + x_at(c + 1)) / 2;
        let name = h.col_names.get(c).map_or(c, |&n| n);
        root.draw_text(&name.to_string(), &centred(label_size), (x, bottom + 16))
            .map_err(e)?;
    }
    let row_step = every(rows, bottom - top);
    for r in (0..rows).step_by(row_step) {
        let y = (y_at(r) + y_at(r + 1)) / 2;
        let style = ("sans-serif", label_size)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Right, VPos::Center));
        let name = h.row_names.get(r).map_or(r, |&n| n);
        root.draw_text(&name.to_string(), &style, (left - 10, y))
            .map_err(e)?;
    }
    root.draw_text(h.x_desc, &centred(24.0), ((left + right) / 2, bottom + 55))
        .map_err(e)?;
    let vertical = |size: f64| {
        ("sans-serif", size)
            .into_font()
            .transform(FontTransform::Rotate270)
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center))
    };
    root.draw_text(h.y_desc, &vertical(24.0), (left - 70, (top + bottom) / 2))
        .map_err(e)?;
    // The colour bar: 200 slices from hi (top) to lo (bottom), 5 ticks.
    let (bx0, bx1) = (right + 50, right + 85);
    let slices = 200;
    for i in 0..slices {
        let y0 = top + (bottom - top) * i / slices;
        let y1 = top + (bottom - top) * (i + 1) / slices;
        let t = 1.0 - (i as f64 + 0.5) / slices as f64;
        root.draw(&Rectangle::new([(bx0, y0), (bx1, y1)], viridis(t).filled()))
            .map_err(e)?;
    }
    root.draw(&Rectangle::new([(bx0, top), (bx1, bottom)], BLACK))
        .map_err(e)?;
    for i in 0..=4 {
        let t = i as f64 / 4.0;
        let y = bottom - ((bottom - top) as f64 * t).round() as i32;
        root.draw(&PathElement::new(vec![(bx1, y), (bx1 + 6, y)], BLACK))
            .map_err(e)?;
        let style = ("sans-serif", 16.0)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Left, VPos::Center));
        root.draw_text(&format!("{:.2}", lo + t * (hi - lo)), &style, (bx1 + 10, y))
            .map_err(e)?;
    }
    root.draw_text(h.bar_desc, &vertical(20.0), (bx1 + 95, (top + bottom) / 2))
        .map_err(e)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viridis_ends_and_clamps() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(2.0), viridis(1.0));
        assert_eq!(viridis(f64::NAN), viridis(0.0));
        assert_eq!(viridis(0.5), RGBColor(33, 145, 140));
    }

    #[test]
    fn default_out_is_the_run_directory() {
        assert_eq!(
            default_out(Path::new("runs/x/checkpoints/step_00000005")),
            PathBuf::from("runs/x/experts")
        );
        assert_eq!(
            default_out(Path::new("init")),
            PathBuf::from("init/experts")
        );
    }
}
