//! `sharedmoe plot`'s library entry: two synthetic runs drawn into
//! loss_train.png and loss_val.png of the right size, with both runs'
//! colours present; missing and malformed metrics are errors naming the
//! file (and line).

use std::path::{Path, PathBuf};

use sharedmoe::cli::plot::{plot_runs, Curve, HEIGHT, PALETTE, WIDTH};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sharedmoe-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A metrics.jsonl shaped like the trainer's: a decaying, noisy loss and a
/// validation loss every 50 steps.
fn write_run(dir: &Path, floor: f64, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut x = seed;
    let mut noise = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) as f64 / (1u64 << 31) as f64) - 0.5
    };
    let mut out = String::new();
    for step in 0..300i64 {
        let clean = floor + 8.0 * (-(step as f64) / 60.0).exp();
        let loss = clean + 0.6 * noise();
        let mut row = serde_json::json!({
            "step": step, "loss": loss, "aux": 0.01, "lr": 3e-4, "grad_norm": 1.0,
            "tokens": (step + 1) * 4096, "step_time_s": 0.1, "tokens_per_s": 40960.0,
            "mfu": null,
        });
        if step % 50 == 49 {
            row["val_loss"] = serde_json::json!(clean + 0.1);
        }
        out.push_str(&row.to_string());
        out.push('\n');
    }
    std::fs::write(dir.join("metrics.jsonl"), out).unwrap();
}

/// (width, height, RGB bytes) of a PNG.
fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.bit_depth, png::BitDepth::Eight, "{}", path.display());
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        c => panic!("{}: colour type {c:?}", path.display()),
    };
    let pixels = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    (info.width, info.height, pixels)
}

fn count(pixels: &[[u8; 3]], c: plotters::style::RGBColor) -> usize {
    pixels.iter().filter(|p| **p == [c.0, c.1, c.2]).count()
}

#[test]
fn two_runs_make_two_pngs_with_both_colours() {
    let root = scratch("plot");
    let (a, b) = (root.join("run-a"), root.join("run-b"));
    write_run(&a, 3.0, 1);
    write_run(&b, 3.6, 2);
    let out = root.join("plots");
    let runs = Curve::one_colour_each([("dense".to_string(), a), ("sharedmoe".to_string(), b)]);
    let files = plot_runs(&runs, &out).unwrap();
    assert_eq!(
        files,
        vec![out.join("loss_train.png"), out.join("loss_val.png")]
    );
    for f in &files {
        let (w, h, pixels) = decode(f);
        assert_eq!((w, h), (WIDTH, HEIGHT), "{}", f.display());
        assert_eq!((w, h), (1200, 800));
        let (n0, n1) = (count(&pixels, PALETTE[0]), count(&pixels, PALETTE[1]));
        assert!(
            n0 > 500 && n1 > 500,
            "{}: {n0} and {n1} pixels of the two runs' colours",
            f.display()
        );
        let white = pixels.iter().filter(|p| **p == [255, 255, 255]).count();
        assert!(
            white > pixels.len() / 2,
            "{}: mostly white background",
            f.display()
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn missing_and_malformed_metrics_name_the_file() {
    let root = scratch("plot-errors");
    let good = root.join("good");
    write_run(&good, 3.0, 3);
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let runs = Curve::one_colour_each([
        ("g".to_string(), good.clone()),
        ("e".to_string(), empty.clone()),
    ]);
    let e = format!("{:#}", plot_runs(&runs, &root).unwrap_err());
    assert!(
        e.contains(&empty.join("metrics.jsonl").display().to_string()),
        "{e}"
    );

    let bad = root.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("metrics.jsonl"),
        "{\"step\":0,\"loss\":5.0}\n{\"step\":1,\"loss\":4.0}\n{\"step\":2,\"loss\n",
    )
    .unwrap();
    let runs = Curve::one_colour_each([("g".to_string(), good), ("b".to_string(), bad.clone())]);
    let e = format!("{:#}", plot_runs(&runs, &root).unwrap_err());
    assert!(
        e.contains(&format!("{}:3", bad.join("metrics.jsonl").display())),
        "{e}"
    );
    assert!(!root.join("loss_train.png").exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn seeds_of_one_model_share_its_colour() {
    let root = scratch("plot-seeds");
    let curve = |name: &str, label: &str, colour: usize, floor: f64, seed: u64| {
        let dir = root.join(name);
        write_run(&dir, floor, seed);
        Curve {
            label: label.to_string(),
            dir,
            colour,
        }
    };
    let runs = vec![
        curve("d0", "dense (2 seeds)", 0, 3.0, 1),
        curve("m0", "sharedmoe (2 seeds)", 1, 3.6, 2),
        curve("d1", "dense (2 seeds)", 0, 3.1, 3),
        curve("m1", "sharedmoe (2 seeds)", 1, 3.5, 4),
    ];
    let out = root.join("plots");
    for f in plot_runs(&runs, &out).unwrap() {
        let (_, _, pixels) = decode(&f);
        let (n0, n1) = (count(&pixels, PALETTE[0]), count(&pixels, PALETTE[1]));
        assert!(n0 > 500 && n1 > 500, "{}: {n0} and {n1}", f.display());
        // Four runs, two colours: the third and fourth are not used.
        for c in [PALETTE[2], PALETTE[3]] {
            assert_eq!(count(&pixels, c), 0, "{}", f.display());
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}
