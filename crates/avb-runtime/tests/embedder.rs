//! The sentence embedder against sentence-transformers (tests/scripts/make_embedder_golden.py): token counts
//! (truncation at max_seq_length included) and embeddings with cosine > 0.9999 on every fixture text.

mod common;

use avb_model::registry;
use avb_runtime::SentenceEmbedder;
use common::{repo_root, row_cosines, test_device};

#[test]
fn minilm_matches_sentence_transformers() {
    let path = repo_root().join("tests/fixtures/embedder/minilm.json");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let texts: Vec<String> = golden["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let dir = registry::ensure("minilm-l6-v2").unwrap();
    let embedder = SentenceEmbedder::load(&dir, &test_device()).unwrap();
    assert_eq!(
        embedder.max_seq_length,
        golden["max_seq_length"].as_u64().unwrap() as usize
    );
    for (text, count) in texts.iter().zip(golden["token_counts"].as_array().unwrap()) {
        let ids = embedder.tokenizer.encode(text, true).unwrap();
        assert_eq!(ids.len() as u64, count.as_u64().unwrap(), "{text:?}");
    }
    let want: Vec<f32> = golden["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    // Batches of 4 in length order: padding is exercised.
    let got = embedder.embed(&texts, 4, &mut |_| {}).unwrap();
    let cos = row_cosines(&got.data, &want, embedder.hidden);
    let worst = cos.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "MiniLM vs sentence-transformers: {} texts, worst cosine 1 - {:.2e}",
        texts.len(),
        1.0 - worst
    );
    assert!(worst > 0.9999, "cosines {cos:?}");
    for row in got.data.chunks(embedder.hidden) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}
