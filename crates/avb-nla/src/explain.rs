//! The explanation conditions of the cross-model experiment and their JSONL records.
//!
//! - `native`: the source feature -> the source model's verbalizer.
//! - `cross`: the feature through the ridge map (linear part) -> the target model's verbalizer.
//! - `cross-washout`: as cross, blended with the target's washout vector, normalize(normalize(m) + w b), per w.
//! - `random-native`, `random-cross`, `random-cross-washout`: seeded random unit directions of the source space
//!   pushed through the same path (the controls of the control-lift variant).
//!
//! Output is resumable: records are appended one per line as they finish, a torn last line is dropped on the next
//! run, and finished (condition, feature, w) keys are skipped. Every record carries the full settings; a file
//! made with other settings is refused rather than mixed.

use crate::protocol::ParseStatus;
use crate::verbalizer::{Explanation, Verbalizer};
use avb_core::ridge::AffineMap;
use avb_core::rng::SplitMix64;
use avb_core::washout::{mix, normalize};
use avb_core::{AvbError, Matrix, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Condition {
    Native,
    Cross,
    CrossWashout,
    RandomNative,
    RandomCross,
    RandomCrossWashout,
}

impl Condition {
    pub const ALL: [Condition; 6] = [
        Condition::Native,
        Condition::Cross,
        Condition::CrossWashout,
        Condition::RandomNative,
        Condition::RandomCross,
        Condition::RandomCrossWashout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Condition::Native => "native",
            Condition::Cross => "cross",
            Condition::CrossWashout => "cross-washout",
            Condition::RandomNative => "random-native",
            Condition::RandomCross => "random-cross",
            Condition::RandomCrossWashout => "random-cross-washout",
        }
    }

    pub fn parse(s: &str) -> Result<Condition> {
        Condition::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                AvbError::Invalid(format!(
                    "unknown condition `{s}`; known: {}",
                    Condition::ALL.map(Condition::name).join(", ")
                ))
            })
    }

    pub fn is_random(self) -> bool {
        matches!(
            self,
            Condition::RandomNative | Condition::RandomCross | Condition::RandomCrossWashout
        )
    }

    /// Read by the source model's verbalizer (else the target's).
    pub fn uses_source_av(self) -> bool {
        matches!(self, Condition::Native | Condition::RandomNative)
    }

    pub fn needs_map(self) -> bool {
        !self.uses_source_av()
    }

    pub fn needs_washout(self) -> bool {
        matches!(
            self,
            Condition::CrossWashout | Condition::RandomCrossWashout
        )
    }

    /// The control condition of a cross condition.
    pub fn control(self) -> Option<Condition> {
        match self {
            Condition::Cross => Some(Condition::RandomCross),
            Condition::CrossWashout => Some(Condition::RandomCrossWashout),
            Condition::Native => Some(Condition::RandomNative),
            _ => None,
        }
    }
}

/// One vector to verbalize.
#[derive(Clone, Debug)]
pub struct Job {
    pub condition: Condition,
    pub feature_id: String,
    pub label: Option<String>,
    pub washout_weight: Option<f64>,
    pub vector: Vec<f32>,
}

impl Job {
    pub fn key(&self) -> String {
        record_key(self.condition, &self.feature_id, self.washout_weight)
    }

    /// The job's own sampling seed: the run's seed mixed with an FNV-1a hash of the key.
    pub fn seed(&self, run_seed: u64) -> u64 {
        let hash = self.key().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        SplitMix64::new(run_seed ^ hash).next_u64()
    }
}

fn record_key(c: Condition, id: &str, w: Option<f64>) -> String {
    match w {
        Some(w) => format!("{}|{id}|{w}", c.name()),
        None => format!("{}|{id}", c.name()),
    }
}

/// A feature of the source space.
#[derive(Clone, Debug)]
pub struct Feature {
    pub id: String,
    pub label: Option<String>,
    pub vector: Vec<f32>,
}

pub struct PlanInputs<'a> {
    pub features: &'a [Feature],
    pub conditions: &'a [Condition],
    pub map: Option<&'a AffineMap>,
    pub washout: Option<&'a [f32]>,
    pub washout_weights: &'a [f64],
    pub n_random: usize,
    pub random_seed: u64,
}

/// Seeded random unit directions (Gaussian, normalised) of dimension d.
pub fn random_directions(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let v: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
            normalize(&v).unwrap_or(v)
        })
        .collect()
}

/// Every job of the requested conditions, in a stable order.
pub fn plan(p: &PlanInputs) -> Result<Vec<Job>> {
    let d_src = p.features.first().map_or(0, |f| f.vector.len());
    let randoms: Vec<Feature> = random_directions(p.n_random, d_src, p.random_seed)
        .into_iter()
        .enumerate()
        .map(|(i, vector)| Feature {
            id: format!("random-{i}"),
            label: None,
            vector,
        })
        .collect();
    let mapped = |fs: &[Feature]| -> Result<Vec<Vec<f32>>> {
        let map = p
            .map
            .ok_or_else(|| AvbError::Invalid("cross conditions need a ridge map (--map)".into()))?;
        let x = Matrix::new(
            fs.len(),
            d_src,
            fs.iter().flat_map(|f| f.vector.iter().copied()).collect(),
        );
        let m = map.apply(&x, false)?;
        Ok((0..m.rows).map(|i| m.row(i).to_vec()).collect())
    };
    let mut jobs = Vec::new();
    for &c in p.conditions {
        let fs: &[Feature] = if c.is_random() { &randoms } else { p.features };
        if fs.is_empty() {
            continue;
        }
        let vectors: Vec<Vec<f32>> = if c.needs_map() {
            mapped(fs)?
        } else {
            fs.iter().map(|f| f.vector.clone()).collect()
        };
        let weights: Vec<Option<f64>> = if c.needs_washout() {
            if p.washout.is_none() {
                return Err(AvbError::Invalid(format!(
                    "condition {} needs a washout vector (--washout)",
                    c.name()
                )));
            }
            p.washout_weights.iter().map(|w| Some(*w)).collect()
        } else {
            vec![None]
        };
        for w in weights {
            for (f, v) in fs.iter().zip(&vectors) {
                let vector = match (w, p.washout) {
                    (Some(w), Some(b)) => mix(v, b, w)?,
                    _ => v.clone(),
                };
                jobs.push(Job {
                    condition: c,
                    feature_id: f.id.clone(),
                    label: f.label.clone(),
                    washout_weight: w,
                    vector,
                });
            }
        }
    }
    Ok(jobs)
}

/// What produced a record's text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AvInfo {
    pub model: String,
    pub sidecar: String,
    pub sidecar_sha256: String,
    pub extraction_layer: usize,
    pub injection_layer: usize,
    pub injection_scale: Option<f64>,
    pub zero_shot: bool,
}

impl AvInfo {
    pub fn of(av: &Verbalizer) -> AvInfo {
        AvInfo {
            model: av.lm.name.clone(),
            sidecar: av.sidecar.clone(),
            sidecar_sha256: av.sidecar_sha256.clone(),
            extraction_layer: av.meta.extraction_layer_index,
            injection_layer: av.meta.injection_layer(),
            injection_scale: av.meta.injection_norm(),
            zero_shot: av.meta.is_zero_shot(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileRef {
    pub file: String,
    pub sha256: String,
}

/// Everything that decides the explanations, recorded in every line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub features: FileRef,
    pub features_kind: String,
    pub source_av: Option<AvInfo>,
    pub target_av: Option<AvInfo>,
    pub map: Option<FileRef>,
    pub washout: Option<FileRef>,
    /// "greedy" or "top-p".
    pub sampling: String,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// The token budget given on the command line; 0 = each verbalizer's own (its sidecar, pinned by the hash).
    pub max_new_tokens: usize,
    pub n_random: usize,
    pub random_seed: u64,
    pub precision: String,
    pub tool_version: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub condition: Condition,
    pub feature_id: String,
    pub label: Option<String>,
    pub washout_weight: Option<f64>,
    pub explanation: String,
    pub last_paragraph: String,
    pub raw: String,
    pub parse: ParseStatus,
    pub tokens: usize,
    pub finish: String,
    pub settings: Settings,
}

impl Record {
    pub fn new(job: &Job, e: &Explanation, settings: &Settings) -> Record {
        Record {
            condition: job.condition,
            feature_id: job.feature_id.clone(),
            label: job.label.clone(),
            washout_weight: job.washout_weight,
            explanation: e.explanation.clone(),
            last_paragraph: e.last_paragraph.clone(),
            raw: e.raw.clone(),
            parse: e.parse,
            tokens: e.tokens,
            finish: e.finish.to_string(),
            settings: settings.clone(),
        }
    }

    pub fn key(&self) -> String {
        record_key(self.condition, &self.feature_id, self.washout_weight)
    }
}

/// Records of a JSONL file. A last line that does not parse (a run killed mid-write) is reported as torn.
pub fn read_records(path: &Path) -> Result<(Vec<Record>, bool)> {
    let text = std::fs::read_to_string(path).map_err(|e| AvbError::io(path, e))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    let mut torn = false;
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Record>(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => torn = true,
            Err(e) => {
                return Err(AvbError::corrupt(
                    path,
                    format!("line {} is not an explanation record ({e})", i + 1),
                ))
            }
        }
    }
    Ok((out, torn))
}

/// An append-only JSONL writer that resumes a previous run with the same settings.
pub struct RecordWriter {
    file: std::fs::File,
    pub done: BTreeSet<String>,
}

impl RecordWriter {
    pub fn open(path: &Path, settings: &Settings) -> Result<RecordWriter> {
        let mut done = BTreeSet::new();
        if path.exists() {
            let (records, torn) = read_records(path)?;
            // A record written whole but without its newline (killed in between) would be joined to the next.
            let unterminated = std::fs::read(path)
                .map_err(|e| AvbError::io(path, e))?
                .last()
                .is_some_and(|b| *b != b'\n');
            if let Some(r) = records.iter().find(|r| &r.settings != settings) {
                return Err(AvbError::Invalid(format!(
                    "{} holds explanations made with other settings (first: {} {}); write to a new file or delete it",
                    path.display(),
                    r.condition.name(),
                    r.feature_id
                )));
            }
            if torn || unterminated {
                // Rewrite without the torn line, every record on its own line (temp file, then rename).
                let mut text = String::new();
                for r in &records {
                    text.push_str(&to_line(r)?);
                }
                avb_core::io::write_atomic(path, &[text.as_bytes()])?;
            }
            done = records.iter().map(Record::key).collect();
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| AvbError::io(path, e))?;
        Ok(RecordWriter { file, done })
    }

    pub fn write(&mut self, r: &Record) -> Result<()> {
        let line = to_line(r)?;
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| AvbError::Invalid(format!("writing an explanation record failed: {e}")))?;
        self.done.insert(r.key());
        Ok(())
    }
}

fn to_line(r: &Record) -> Result<String> {
    let mut s = serde_json::to_string(r)
        .map_err(|e| AvbError::Invalid(format!("cannot serialize a record: {e}")))?;
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn settings() -> Settings {
        Settings {
            features: FileRef {
                file: "f.npy".into(),
                sha256: "0".repeat(64),
            },
            features_kind: "directions".into(),
            source_av: None,
            target_av: None,
            map: None,
            washout: None,
            sampling: "greedy".into(),
            temperature: 0.0,
            top_p: 0.0,
            seed: 0,
            max_new_tokens: 0,
            n_random: 0,
            random_seed: 7,
            precision: "f32".into(),
            tool_version: "test".into(),
        }
    }

    pub(crate) fn record(c: Condition, id: &str, label: Option<&str>, text: &str) -> Record {
        Record {
            condition: c,
            feature_id: id.into(),
            label: label.map(str::to_string),
            washout_weight: None,
            explanation: text.into(),
            last_paragraph: text.into(),
            raw: text.into(),
            parse: ParseStatus::Plain,
            tokens: 3,
            finish: "stop_token".into(),
            settings: settings(),
        }
    }

    #[test]
    fn resuming_repairs_torn_and_unterminated_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.jsonl");
        let line = |id: &str| to_line(&record(Condition::Native, id, None, "x")).unwrap();
        // Whole records, the last one without its newline.
        let text = format!("{}{}", line("0"), line("1").trim_end());
        std::fs::write(&path, &text).unwrap();
        let mut w = RecordWriter::open(&path, &settings()).unwrap();
        assert_eq!(w.done.len(), 2);
        w.write(&record(Condition::Native, "2", None, "x")).unwrap();
        let (records, torn) = read_records(&path).unwrap();
        assert_eq!((records.len(), torn), (3, false));
        // A torn last line is dropped.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"condition\": \"nat");
        std::fs::write(&path, &text).unwrap();
        let w = RecordWriter::open(&path, &settings()).unwrap();
        assert_eq!(w.done.len(), 3);
        // Other settings are refused.
        let mut other = settings();
        other.seed = 1;
        assert!(RecordWriter::open(&path, &other).is_err());
    }

    #[test]
    fn job_seeds_depend_on_the_job_not_its_batch() {
        let job = |id: &str| Job {
            condition: Condition::Cross,
            feature_id: id.into(),
            label: None,
            washout_weight: Some(1.0),
            vector: vec![],
        };
        assert_eq!(job("3").seed(5), job("3").seed(5));
        assert_ne!(job("3").seed(5), job("4").seed(5));
        assert_ne!(job("3").seed(5), job("3").seed(6));
    }
}
