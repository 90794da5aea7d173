//! Build script: Rust bindings for the PJRT C API, generated from the
//! header that the installed `xla-cpu-pjrt` package ships (never a vendored
//! copy), and prost/tonic code for `proto/`.

use std::env;
use std::path::{Path, PathBuf};

const HEADER: &str = "pjrt_c_api.h";

/// Directories holding `pjrt_c_api.h`, in order of preference.
fn header_candidates(manifest: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![];
    if let Ok(d) = env::var("SHAREDMOE_PJRT_INCLUDE") {
        dirs.push(PathBuf::from(d));
    }
    let mut venvs = vec![manifest.join(".venv")];
    if let Ok(v) = env::var("VIRTUAL_ENV") {
        venvs.push(PathBuf::from(v));
    }
    for venv in venvs {
        if let Ok(entries) = std::fs::read_dir(venv.join("lib")) {
            for e in entries.flatten() {
                dirs.push(
                    e.path()
                        .join("site-packages/xla_plugins/xla_cpu_pjrt/include"),
                );
            }
        }
    }
    dirs
}

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=SHAREDMOE_PJRT_INCLUDE");
    println!(
        "cargo:rustc-env=SHAREDMOE_BUILD_VENV={}",
        manifest.join(".venv").display()
    );

    let candidates = header_candidates(&manifest);
    let Some(include) = candidates.iter().find(|d| d.join(HEADER).is_file()) else {
        panic!(
            "\n\nsharedmoe: cannot find {HEADER} (shipped by the `xla-cpu-pjrt` pip package).\n\
             Run scripts/setup.sh (installs it into .venv), or set SHAREDMOE_PJRT_INCLUDE to the\n\
             directory holding it. Looked in:\n  {}\n",
            candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    };
    let header = include.join(HEADER);
    println!("cargo:rerun-if-changed={}", header.display());
    bindgen::Builder::default()
        .header(header.to_string_lossy())
        .allowlist_type("PJRT_.*")
        .allowlist_var("PJRT_.*")
        .allowlist_function("PJRT_.*")
        .derive_default(true)
        .layout_tests(false)
        .prepend_enum_name(false)
        .generate()
        .expect("bindgen over pjrt_c_api.h")
        .write_to_file(out.join("pjrt_c_api.rs"))
        .expect("write bindings");

    prost_build::Config::new()
        .compile_protos(&["proto/xla_compile_options.proto"], &["proto"])
        .expect("compile proto/xla_compile_options.proto");
    prost_build::Config::new()
        .compile_protos(&["proto/tensorboard.proto"], &["proto"])
        .expect("compile proto/tensorboard.proto");
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/coordinator.proto"], &["proto"])
        .expect("compile proto/coordinator.proto");
}
