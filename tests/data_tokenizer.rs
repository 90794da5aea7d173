//! Byte-level BPE training on real text, save/load, round trips, and
//! packing tokenized documents into rows.

use std::path::Path;

use sharedmoe::data::packing::Packer;
use sharedmoe::data::tokenizer::{encode, eot_id, load, save, train_bpe, EOT};

#[test]
fn trained_bpe_round_trips_and_packs() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/rust-book-ch01-04.txt"),
    )
    .unwrap();
    let paragraphs: Vec<&str> = text
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .collect();
    let tk = train_bpe(paragraphs.iter().copied(), 600, 2, false).unwrap();
    assert_eq!(tk.get_vocab_size(true), 600);
    let eot = eot_id(&tk).unwrap();
    let dir = std::env::temp_dir().join(format!("sharedmoe-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    save(&tk, &path).unwrap();
    let tk = load(&path).unwrap();
    assert_eq!(eot_id(&tk).unwrap(), eot);
    let sample = "Ownership is Rust’s most unique feature — naïve café ✓";
    let ids = encode(&tk, sample).unwrap();
    assert!(
        ids.len() < sample.len(),
        "BPE should merge: {} ids for {} bytes",
        ids.len(),
        sample.len()
    );
    assert_eq!(tk.decode(&ids, false).unwrap(), sample);
    assert_eq!(
        encode(&tk, EOT).unwrap(),
        vec![eot],
        "the end-of-text token is one special token"
    );
    // Packing: documents joined by EOT, cut into rows of S + 1 = 9.
    let docs = ["fn main() {}", "let x = 5;"];
    let mut stream = vec![];
    let mut packer = Packer::new(9, eot);
    let mut rows = vec![];
    for d in docs {
        let t = encode(&tk, d).unwrap();
        stream.extend(&t);
        stream.push(eot);
        rows.extend(packer.push(&t));
    }
    let flat: Vec<u32> = rows.concat();
    assert_eq!(flat[..], stream[..flat.len()]);
    assert_eq!(flat.len() + packer.pending(), stream.len());
    let err = format!("{:#}", load(&dir.join("missing.json")).unwrap_err());
    assert!(err.contains("missing.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
