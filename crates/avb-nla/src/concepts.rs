//! Labelled concept groups over the Wikipedia summaries: an article joins the first group whose pattern matches
//! its `description` (groups are disjoint), each group keeps up to `per_group` articles chosen with a seed, and
//! its texts are the articles' lead sentences. `concepts.json` holds the groups; `avb directions` turns each into
//! one labelled direction (mean activation of the group minus the corpus mean).

use avb_core::rng::permutation;
use avb_core::{AvbError, Result};
use regex::RegexBuilder;
use std::path::Path;

pub const CONCEPTS: &str = include_str!("../concepts.json");

#[derive(Clone, Debug)]
pub struct ConceptGroup {
    pub label: String,
    pub titles: Vec<String>,
    pub texts: Vec<String>,
}

/// The lead sentence of a summary (its first `. ` boundary), or the whole text when shorter than 40 chars there.
fn lead_sentence(extract: &str) -> String {
    let mut end = extract.len();
    for (i, _) in extract.match_indices(". ") {
        if i >= 40 {
            end = i + 1;
            break;
        }
    }
    extract[..end].trim().to_string()
}

/// Groups from a `summaries_<lang>.json` file of the wiki-summaries artefact. Groups with fewer than `min_size`
/// articles are dropped.
pub fn wiki_groups(
    summaries: &Path,
    per_group: usize,
    min_size: usize,
    seed: u64,
) -> Result<Vec<ConceptGroup>> {
    let table: serde_json::Value = serde_json::from_str(CONCEPTS)
        .map_err(|e| AvbError::Invalid(format!("concepts.json is not valid JSON: {e}")))?;
    let mut patterns = Vec::new();
    for g in table["groups"].as_array().into_iter().flatten() {
        let label = g["label"].as_str().unwrap_or_default().to_string();
        let pattern = g["pattern"].as_str().unwrap_or_default();
        let re = RegexBuilder::new(pattern)
            .case_insensitive(true)
            .build()
            .map_err(|e| AvbError::Invalid(format!("concept `{label}`: bad pattern ({e})")))?;
        patterns.push((label, re));
    }
    let text = std::fs::read_to_string(summaries).map_err(|e| AvbError::io(summaries, e))?;
    let articles: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| AvbError::corrupt(summaries, format!("not a summaries JSON object ({e})")))?;
    let mut members: Vec<Vec<(String, String)>> = vec![Vec::new(); patterns.len()];
    // Sorted titles: membership does not depend on the file's key order.
    let mut titles: Vec<&String> = articles.keys().collect();
    titles.sort();
    for title in titles {
        let a = &articles[title];
        let desc = a["description"].as_str().unwrap_or("");
        let extract = a["extract"].as_str().unwrap_or("");
        if desc.is_empty() || extract.len() < 20 {
            continue;
        }
        if let Some(g) = patterns.iter().position(|(_, re)| re.is_match(desc)) {
            members[g].push((title.clone(), lead_sentence(extract)));
        }
    }
    let mut out = Vec::new();
    for (g, ((label, _), m)) in patterns.into_iter().zip(members).enumerate() {
        if m.len() < min_size {
            continue;
        }
        let (titles, texts) = permutation(m.len(), seed ^ g as u64)
            .into_iter()
            .take(per_group)
            .map(|i| m[i].clone())
            .unzip();
        out.push(ConceptGroup {
            label,
            titles,
            texts,
        });
    }
    Ok(out)
}
