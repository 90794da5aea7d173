//! Generation: greedy decoding with the key/value cache equals greedy
//! decoding that recomputes the whole sequence every step, for both
//! models; sampling with a fixed seed is deterministic.

mod common;

use sharedmoe::generate::{Generator, Sampling};
use sharedmoe::model::ModelConfig;
use sharedmoe::train::trainer::fresh_checkpoint;
use sharedmoe::train::Config;

fn config(preset: &str) -> Config {
    Config::parse(
        &format!(
            "[model]\npreset = \"{preset}\"\nvocab_size = 512\n[train]\nseq_len = 32\nglobal_batch = 4\nmicro_batch = 4\nsteps = 10\nwarmup_steps = 1\nlr = 1e-3\nmin_lr = 1e-4\n[data]\ntrain_bin = \"unused.bin\"\n"
        ),
        &[],
    )
    .unwrap()
}

fn generator(preset: &str, max_len: i64) -> (Generator, ModelConfig) {
    let cfg = config(preset);
    let ckpt = fresh_checkpoint(&cfg, 3);
    (
        Generator::new(common::client(), &cfg.model, &ckpt.params, max_len).unwrap(),
        cfg.model,
    )
}

const PROMPT: [u32; 5] = [17, 300, 5, 99, 250];

#[test]
fn greedy_with_the_cache_equals_recomputing_the_sequence() {
    let greedy = Sampling {
        temperature: 0.0,
        top_k: 0,
        seed: 0,
    };
    for preset in ["tiny-dense", "tiny-sharedmoe"] {
        let (g, _) = generator(preset, 32);
        let cached = g.generate(&PROMPT, 24, &greedy, None, true).unwrap();
        let full = g.generate(&PROMPT, 24, &greedy, None, false).unwrap();
        assert_eq!(cached.len(), 24);
        // (An untrained model with tied embeddings mostly repeats the last
        // token greedily; the sampled test below compares varied tokens.)
        assert_eq!(cached, full, "{preset}");
    }
}

#[test]
fn sampling_with_a_seed_is_deterministic_and_the_seed_matters() {
    let (g, _) = generator("tiny-sharedmoe", 32);
    let s = |seed| Sampling {
        temperature: 1.0,
        top_k: 40,
        seed,
    };
    let a = g.generate(&PROMPT, 20, &s(7), None, true).unwrap();
    let b = g.generate(&PROMPT, 20, &s(7), None, true).unwrap();
    let c = g.generate(&PROMPT, 20, &s(8), None, true).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let distinct: std::collections::HashSet<_> = a.iter().collect();
    assert!(distinct.len() > 5, "{a:?}");
    // The reference path (no cache) draws the same tokens from the same
    // seed: the cached logits match at every position.
    assert_eq!(a, g.generate(&PROMPT, 20, &s(7), None, false).unwrap());
    let (dense, _) = generator("tiny-dense", 32);
    let d = dense.generate(&PROMPT, 20, &s(5), None, true).unwrap();
    assert_eq!(d, dense.generate(&PROMPT, 20, &s(5), None, false).unwrap());
}

#[test]
fn a_stop_token_ends_generation_and_overlong_requests_are_refused() {
    let greedy = Sampling {
        temperature: 0.0,
        top_k: 0,
        seed: 0,
    };
    let (g, _) = generator("tiny-dense", 16);
    let free = g.generate(&PROMPT, 8, &greedy, None, true).unwrap();
    let stopped = g
        .generate(&PROMPT, 8, &greedy, Some(free[2]), true)
        .unwrap();
    assert_eq!(
        stopped,
        free[..=free.iter().position(|&t| t == free[2]).unwrap()].to_vec()
    );
    let e = g.generate(&PROMPT, 12, &greedy, None, true).unwrap_err();
    assert!(e.to_string().contains("exceed"), "{e}");
}
