//! The shipped zero-shot profiles: they load on their real models with one checked placeholder site, a profile
//! is refused on a model other than the one it was measured on, and `make_profile` reproduces a shipped profile.

#[path = "../../avb-runtime/tests/common/mod.rs"]
mod common;

use avb_model::registry;
use avb_nla::profiles::{self, make_profile, ProfileOptions};
use avb_nla::{NlaMeta, Verbalizer};
use avb_runtime::{loader, Precision};
use common::{repo_root, test_device};
use std::path::Path;

#[test]
fn shipped_profiles_open_on_their_models() {
    for name in profiles::names() {
        let av = Verbalizer::open(name, &test_device(), Precision::F32).unwrap();
        assert_eq!(av.prompt.sites.len(), 1, "{name}");
        assert!(av.meta.is_zero_shot());
        assert_eq!(av.meta.d_model, av.lm.model.config.hidden_size);
        let z = av.meta.avbridge.as_ref().unwrap();
        println!(
            "{name}: placeholder {:?} at {} of {} prompt tokens, injection at block {} input, scale {:.2}",
            av.meta.tokens.injection_char,
            av.prompt.sites[0],
            av.prompt.ids.len(),
            z.injection_layer,
            av.meta.injection_norm().unwrap()
        );
    }
}

#[test]
fn a_profile_is_refused_on_another_model_file() {
    let text = profiles::builtin("smollm2-135m-instruct").unwrap();
    let meta = NlaMeta::from_yaml(text, Path::new("builtin")).unwrap();
    let gguf = registry::ensure("smollm2-135m-instruct").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("profile.yaml");
    let wrong = text
        .replace(
            &meta.avbridge.as_ref().unwrap().model_sha256,
            &"0".repeat(64),
        )
        .replace(
            "model: smollm2-135m-instruct",
            &format!("model: {}", gguf.display()),
        );
    std::fs::write(&other, wrong).unwrap();
    let err = Verbalizer::open(other.to_str().unwrap(), &test_device(), Precision::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("sha256") && err.contains("avb profile"),
        "{err}"
    );
}

#[test]
fn make_profile_reproduces_the_shipped_qwen_profile() {
    let name = "qwen2.5-coder-0.5b-instruct";
    let shipped =
        NlaMeta::from_yaml(profiles::builtin(name).unwrap(), Path::new("builtin")).unwrap();
    let z = shipped.avbridge.as_ref().unwrap();
    let lm = loader::open(name, &test_device(), Precision::F32).unwrap();
    let corpus =
        std::fs::read_to_string(repo_root().join("tests/fixtures/corpus/wiki_en_sentences.jsonl"))
            .unwrap();
    let texts: Vec<String> = corpus
        .lines()
        .take(z.scale_measured.n_texts)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let made = make_profile(
        &lm,
        &texts,
        &ProfileOptions {
            injection_layer: z.injection_layer,
            extraction_layer: shipped.extraction_layer_index,
            multiplier: 1.0,
            prompt: None,
            max_new_tokens: z.max_new_tokens,
            corpus_name: z.scale_measured.corpus.clone(),
            model_sha256: z.model_sha256.clone(),
        },
    )
    .unwrap();
    let (a, b) = (
        made.injection_norm().unwrap(),
        shipped.injection_norm().unwrap(),
    );
    assert!((a - b).abs() / b < 1e-4, "scale {a} vs shipped {b}");
    assert_eq!(
        made.tokens.injection_token_id,
        shipped.tokens.injection_token_id
    );
    assert_eq!(
        made.tokens.injection_left_neighbor_id,
        shipped.tokens.injection_left_neighbor_id
    );
    assert_eq!(
        made.tokens.injection_right_neighbor_id,
        shipped.tokens.injection_right_neighbor_id
    );
}
