//! The AV protocol of shared/docs/nla-protocol.md: the prompt (template + chat template, one tokenization),
//! placeholder sites checked by their neighbours, the vector rescaled in fp32, and the explanation parsed.

use crate::sidecar::NlaMeta;
use avb_core::{AvbError, Result};
use avb_model::chat::{ChatTemplate, Message};
use avb_model::tokenizer::Tokenizer;

/// Token ids of the AV prompt and the positions of its placeholder sites.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AvPrompt {
    pub ids: Vec<u32>,
    pub sites: Vec<usize>,
}

/// Build the AV prompt for `n_vectors` vectors (the released AVs take one).
pub fn build_prompt(
    meta: &NlaMeta,
    tokenizer: &Tokenizer,
    chat: Option<&ChatTemplate>,
    n_vectors: usize,
) -> Result<AvPrompt> {
    let text = meta
        .av_template()
        .replace("{injection_char}", &meta.tokens.injection_char);
    let ids = if meta.uses_chat_template() {
        let chat = chat.ok_or_else(|| {
            AvbError::Invalid(
                "the verbalizer's sidecar asks for a chat template and the model has none (tokenizer_config.json `chat_template` or GGUF `tokenizer.chat_template`); give a model that ships one, or a profile with chat_template: false".into(),
            )
        })?;
        let rendered = chat.render(&[Message::new("user", &text)], true)?;
        // The rendered text already holds BOS where the template puts it: encoding it with special tokens would
        // add a second one and shift every position (the double-BOS trap).
        tokenizer.encode(&rendered, false)?
    } else {
        tokenizer.encode(&text, true)?
    };
    let sites = find_sites(meta, &ids);
    if sites.len() != n_vectors {
        return Err(AvbError::Invalid(format!(
            "the AV prompt has {} placeholder site(s) for {n_vectors} vector(s): token {} (`{}`) with neighbours {:?} / {:?}; check that the sidecar belongs to this tokenizer and that its template holds `{{injection_char}}` once per vector",
            sites.len(),
            meta.tokens.injection_token_id,
            meta.tokens.injection_char,
            meta.tokens.injection_left_neighbor_id,
            meta.tokens.injection_right_neighbor_id,
        )));
    }
    Ok(AvPrompt { ids, sites })
}

/// Positions holding the placeholder token whose neighbours are the sidecar's (a neighbour the sidecar leaves
/// unset matches anything).
pub fn find_sites(meta: &NlaMeta, ids: &[u32]) -> Vec<usize> {
    let t = &meta.tokens;
    (0..ids.len())
        .filter(|&p| ids[p] == t.injection_token_id)
        .filter(|&p| {
            t.injection_left_neighbor_id
                .is_none_or(|l| p > 0 && ids[p - 1] == l)
        })
        .filter(|&p| {
            t.injection_right_neighbor_id
                .is_none_or(|r| ids.get(p + 1) == Some(&r))
        })
        .collect()
}

/// v / (||v|| / scale) in fp32, as the reference computes it; the vector as given when `scale` is None.
pub fn rescale(v: &[f32], scale: Option<f64>) -> Result<Vec<f32>> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(AvbError::Invalid(format!(
            "the vector to verbalize has a non-finite value at index {i}"
        )));
    }
    let Some(scale) = scale else {
        return Ok(v.to_vec());
    };
    // The correctly rounded fp32 norm. torch's fp32 reduction may differ from it by an ulp (its summation
    // order), so the rescaled row can differ from the reference's by an ulp.
    let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt() as f32;
    if norm == 0.0 {
        return Err(AvbError::Invalid(
            "the vector to verbalize is all zeros: it has no direction".into(),
        ));
    }
    let divisor = norm / scale as f32;
    Ok(v.iter().map(|x| x / divisor).collect())
}

/// How the explanation was found in the generated text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParseStatus {
    /// `<explanation>...</explanation>` found.
    Tagged,
    /// An opening tag and no closing one (the token budget ran out): the text after the tag.
    Unterminated,
    /// No tags: the whole text (zero-shot profiles read plain text).
    Plain,
}

/// `<explanation>\s*(.*?)\s*</explanation>` (first match, across lines), with the fallbacks above.
pub fn parse_explanation(text: &str, tags: bool) -> (String, ParseStatus) {
    const OPEN: &str = "<explanation>";
    const CLOSE: &str = "</explanation>";
    if tags {
        if let Some(start) = text.find(OPEN) {
            let rest = &text[start + OPEN.len()..];
            return match rest.find(CLOSE) {
                Some(end) => (rest[..end].trim().to_string(), ParseStatus::Tagged),
                None => (rest.trim().to_string(), ParseStatus::Unterminated),
            };
        }
    }
    (text.trim().to_string(), ParseStatus::Plain)
}

/// Non-empty paragraphs (blank-line separated; single lines when there are no blank lines), trimmed.
pub fn paragraphs(text: &str) -> Vec<String> {
    let split: Vec<String> = text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    if split.len() > 1 {
        return split;
    }
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The last non-empty paragraph (Neuronpedia's nla_verbalizer_last reads only this part).
pub fn last_paragraph(text: &str) -> String {
    paragraphs(text).pop().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explanations_are_parsed_as_the_reference_regex_does() {
        let t = "Sure.\n<explanation>\n  Genre: news.\n\n\"the war\"\n\nFinal token \"the\"  \n</explanation> tail";
        let (e, s) = parse_explanation(t, true);
        assert_eq!(s, ParseStatus::Tagged);
        assert_eq!(e, "Genre: news.\n\n\"the war\"\n\nFinal token \"the\"");
        assert_eq!(paragraphs(&e).len(), 3);
        assert_eq!(last_paragraph(&e), "Final token \"the\"");
        assert_eq!(
            parse_explanation("<explanation> cut off", true),
            ("cut off".into(), ParseStatus::Unterminated)
        );
        assert_eq!(
            parse_explanation(" Music\n", false),
            ("Music".into(), ParseStatus::Plain)
        );
        assert_eq!(last_paragraph("one line\nsecond line"), "second line");
    }

    #[test]
    fn rescale_matches_the_reference_and_refuses_degenerate_vectors() {
        // fp32, as torch computes v / (||v|| / scale) (so 3 -> 89.99999, not 90).
        let v = rescale(&[3.0, 4.0], Some(150.0)).unwrap();
        let divisor = 5.0f32 / 150.0;
        assert_eq!(v, vec![3.0 / divisor, 4.0 / divisor]);
        assert_eq!(rescale(&[3.0, 4.0], None).unwrap(), vec![3.0, 4.0]);
        assert!(rescale(&[0.0, 0.0], Some(1.0)).is_err());
        assert!(rescale(&[f32::NAN, 1.0], Some(1.0)).is_err());
    }
}
