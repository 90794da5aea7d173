//! `train.trainable`: which parameters a run trains, as globs over tensor
//! names (`*` any run of characters, dots included; `?` one character).
//! Empty means every parameter. The others are frozen: the step takes no
//! gradient for them, keeps no Adam moments and never writes them (they
//! are neither donated nor returned), so they stay byte-identical.

use anyhow::{bail, Result};

use crate::model::ParamSpec;

/// Whether `name` matches `pattern` (`*`, `?`; everything else literal).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Greedy match with one backtrack point (the last `*`), as fnmatch.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < s.len() {
        if i < p.len() && (p[i] == '?' || p[i] == s[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// The positions in `specs` of the trainable parameters, in order. Refuses
/// a glob that matches no parameter (a typo would silently freeze
/// everything it meant to train) and a selection that trains nothing.
pub fn trainable_indices(specs: &[ParamSpec], globs: &[String]) -> Result<Vec<usize>> {
    if globs.is_empty() {
        return Ok((0..specs.len()).collect());
    }
    for g in globs {
        if !specs.iter().any(|s| glob_match(g, &s.name)) {
            let names: Vec<&str> = specs.iter().take(6).map(|s| s.name.as_str()).collect();
            bail!(
                "train.trainable: `{g}` matches no parameter of this model (its tensors are named \
                 like {}, ...)",
                names.join(", ")
            );
        }
    }
    let chosen: Vec<usize> = specs
        .iter()
        .enumerate()
        .filter(|(_, s)| globs.iter().any(|g| glob_match(g, &s.name)))
        .map(|(i, _)| i)
        .collect();
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_fnmatch() {
        assert!(glob_match(
            "model.pool.router.weight",
            "model.pool.router.weight"
        ));
        assert!(glob_match("*router*", "model.pool.router.weight"));
        assert!(glob_match(
            "model.layers.*.mlp.gate.weight",
            "model.layers.12.mlp.gate.weight"
        ));
        assert!(!glob_match(
            "model.layers.*.mlp.gate.weight",
            "model.layers.1.mlp.gate_proj"
        ));
        assert!(glob_match(
            "model.layers.?.self_attn.*",
            "model.layers.3.self_attn.q_proj.weight"
        ));
        assert!(!glob_match(
            "model.layers.?.self_attn.*",
            "model.layers.13.self_attn.q_proj.weight"
        ));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a", ""));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("*.weight", "lm_head.weight"));
    }

    #[test]
    fn trainable_indices_refuse_a_glob_matching_nothing() {
        let spec = |n: &str| ParamSpec {
            name: n.into(),
            ..crate::model::param_specs(&crate::model::ModelConfig::preset("tiny-moe").unwrap())[0]
                .clone()
        };
        let specs = [spec("a.router"), spec("a.experts"), spec("b.router")];
        assert_eq!(trainable_indices(&specs, &[]).unwrap(), vec![0, 1, 2]);
        assert_eq!(
            trainable_indices(&specs, &["*.router".into()]).unwrap(),
            vec![0, 2]
        );
        let e = trainable_indices(&specs, &["*.routr".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`*.routr` matches no parameter"), "{e}");
    }
}
