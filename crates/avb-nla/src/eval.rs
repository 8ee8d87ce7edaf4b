//! Scoring explanations as the post did and beyond: feature-specific lift of each cross condition against the
//! native explanations (against the other features, and against random-direction controls), label scores
//! (cosine between explanation and ground-truth label, for the full text and the last paragraph, like
//! Neuronpedia's nla_verbalizer / nla_verbalizer_last, plus a feature-specific label lift), all with means,
//! Student-t and bootstrap CIs and p-values from the core statistics, and SVG plots.

use crate::explain::{Condition, Record};
use avb_core::stats::{self, Summary};
use avb_core::{AvbError, Matrix, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub ci_level: f64,
    pub resamples: usize,
    pub seed: u64,
}

/// A condition at one washout weight.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Arm {
    pub condition: Condition,
    pub washout_weight: Option<f64>,
}

impl Arm {
    pub fn name(&self) -> String {
        match self.washout_weight {
            Some(w) => format!("{} (w = {w})", self.condition.name()),
            None => self.condition.name().to_string(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Scored {
    pub arm: Arm,
    /// `lift` (vs the other features' native explanations), `control-lift` (vs random-direction controls),
    /// `label-cosine`, `label-lift`, `label-control-lift`; with `-last` for the last paragraph.
    pub metric: String,
    pub summary: Summary,
    /// The features scored (indices into `Evaluation::feature_ids`), and their values in that order.
    pub features: Vec<usize>,
    pub values: Vec<f64>,
}

impl Scored {
    /// The value of feature `i` (an index into the evaluation's features), if it was scored.
    pub fn value_of(&self, i: usize) -> Option<f64> {
        self.features
            .iter()
            .position(|&f| f == i)
            .map(|k| self.values[k])
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub feature_ids: Vec<String>,
    pub labels: Vec<Option<String>>,
    pub scores: Vec<Scored>,
    /// Arms present, with their record count.
    pub arms: Vec<(Arm, usize)>,
    /// Metrics that could not be summarised (e.g. every value zero: identical texts), with the reason.
    pub skipped: Vec<(String, String, String)>,
}

impl Evaluation {
    pub fn find(&self, arm: &Arm, metric: &str) -> Option<&Scored> {
        self.scores
            .iter()
            .find(|s| &s.arm == arm && s.metric == metric)
    }
}

/// Records of one arm, keyed by feature id.
fn arm_records<'a>(records: &'a [Record], arm: &Arm) -> BTreeMap<&'a str, &'a Record> {
    records
        .iter()
        .filter(|r| r.condition == arm.condition && r.washout_weight == arm.washout_weight)
        .map(|r| (r.feature_id.as_str(), r))
        .collect()
}

pub fn arms(records: &[Record]) -> Vec<(Arm, usize)> {
    let mut out: Vec<(Arm, usize)> = Vec::new();
    for r in records {
        let arm = Arm {
            condition: r.condition,
            washout_weight: r.washout_weight,
        };
        match out.iter_mut().find(|(a, _)| *a == arm) {
            Some((_, n)) => *n += 1,
            None => out.push((arm, 1)),
        }
    }
    out.sort_by(|a, b| {
        (a.0.condition, a.0.washout_weight.unwrap_or(f64::NAN))
            .partial_cmp(&(b.0.condition, b.0.washout_weight.unwrap_or(f64::NAN)))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    out
}

/// Score every arm. `embed` turns texts into unit-norm sentence embeddings (MiniLM in the CLI).
pub fn evaluate(
    records: &[Record],
    embed: &mut dyn FnMut(&[String]) -> Result<Matrix>,
    opts: &EvalOptions,
) -> Result<Evaluation> {
    let arms = arms(records);
    let native_arm = Arm {
        condition: Condition::Native,
        washout_weight: None,
    };
    // Features: those with a native explanation, in the order they were written (else any real feature).
    let mut feature_ids: Vec<String> = Vec::new();
    for r in records.iter().filter(|r| !r.condition.is_random()) {
        if !feature_ids.contains(&r.feature_id) {
            feature_ids.push(r.feature_id.clone());
        }
    }
    if feature_ids.len() < 2 {
        return Err(AvbError::Empty {
            what: "evaluation".into(),
            detail: format!("{} feature(s) with explanations", feature_ids.len()),
            fix: "explain at least 2 features (lift compares each feature with the others)".into(),
        });
    }
    let labels: Vec<Option<String>> = feature_ids
        .iter()
        .map(|id| {
            records
                .iter()
                .find(|r| &r.feature_id == id)
                .and_then(|r| r.label.clone())
        })
        .collect();
    // Embed every text once.
    let mut texts: Vec<String> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    let mut intern = |t: &str, texts: &mut Vec<String>| {
        *index.entry(t.to_string()).or_insert_with(|| {
            texts.push(t.to_string());
            texts.len() - 1
        })
    };
    let mut rows: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
    for r in records {
        let full = intern(&r.explanation, &mut texts);
        let last = intern(&r.last_paragraph, &mut texts);
        rows.insert((r.key(), "full"), full);
        rows.insert((r.key(), "last"), last);
    }
    let label_rows: Vec<Option<usize>> = labels
        .iter()
        .map(|l| l.as_ref().map(|l| intern(l, &mut texts)))
        .collect();
    let emb = embed(&texts)?;
    let d = emb.cols;
    let gather = |idx: &[usize]| -> Matrix {
        Matrix::new(
            idx.len(),
            d,
            idx.iter()
                .flat_map(|&i| emb.row(i).iter().copied())
                .collect(),
        )
    };
    // Row of each feature's text in one arm (None where the arm has no record for the feature yet).
    let part_rows = |arm: &Arm, part: &'static str| -> Vec<Option<usize>> {
        let recs = arm_records(records, arm);
        feature_ids
            .iter()
            .map(|id| {
                recs.get(id.as_str())
                    .and_then(|r| rows.get(&(r.key(), part)).copied())
            })
            .collect()
    };
    let control_rows = |arm: &Arm, part: &'static str| -> Vec<usize> {
        let Some(c) = arm.condition.control() else {
            return Vec::new();
        };
        let control = Arm {
            condition: c,
            washout_weight: arm.washout_weight,
        };
        arm_records(records, &control)
            .values()
            .filter_map(|r| rows.get(&(r.key(), part)).copied())
            .collect()
    };
    let summarize = |v: &[f64]| stats::summarize(v, opts.ci_level, opts.resamples, opts.seed);
    let mut scores = Vec::new();
    let mut skipped = Vec::new();
    let mut push = |arm: &Arm, metric: String, features: &[usize], values: Vec<f64>| match summarize(
        &values,
    ) {
        Ok(summary) => scores.push(Scored {
            arm: arm.clone(),
            metric,
            summary,
            features: features.to_vec(),
            values,
        }),
        Err(e) => skipped.push((arm.name(), metric, e.to_string())),
    };
    let n_features = feature_ids.len();
    let mut coverage = Vec::new();
    for (arm, _) in arms.iter().filter(|(a, _)| !a.condition.is_random()) {
        for part in ["full", "last"] {
            let suffix = if part == "last" { "-last" } else { "" };
            let own = part_rows(arm, part);
            let ctrl = control_rows(arm, part);
            // Lift against the native explanations (the same part), over the features both arms have.
            if arm.condition != Condition::Native {
                let native = part_rows(&native_arm, part);
                let both: Vec<usize> = (0..n_features)
                    .filter(|&i| own[i].is_some() && native[i].is_some())
                    .collect();
                if both.len() < n_features {
                    coverage.push((
                        arm.name(),
                        format!("lift{suffix} (coverage)"),
                        format!(
                            "{} of {n_features} features have both a native and a {} explanation; the lifts use those",
                            both.len(),
                            arm.name()
                        ),
                    ));
                }
                if both.len() >= 2 {
                    let c = gather(&both.iter().filter_map(|&i| own[i]).collect::<Vec<_>>());
                    let n = gather(&both.iter().filter_map(|&i| native[i]).collect::<Vec<_>>());
                    push(arm, format!("lift{suffix}"), &both, stats::lift(&c, &n)?);
                    if !ctrl.is_empty() {
                        let v = stats::control_lift(&c, &n, &gather(&ctrl))?;
                        push(arm, format!("control-lift{suffix}"), &both, v);
                    }
                }
            }
            // Label scores over the labelled features the arm has.
            let labelled: Vec<usize> = (0..n_features)
                .filter(|&i| own[i].is_some() && label_rows[i].is_some())
                .collect();
            if labelled.len() >= 2 {
                let cl = gather(&labelled.iter().filter_map(|&i| own[i]).collect::<Vec<_>>());
                let lm = gather(
                    &labelled
                        .iter()
                        .filter_map(|&i| label_rows[i])
                        .collect::<Vec<_>>(),
                );
                let cos: Vec<f64> = (0..cl.rows).map(|i| dot(cl.row(i), lm.row(i))).collect();
                push(arm, format!("label-cosine{suffix}"), &labelled, cos);
                push(
                    arm,
                    format!("label-lift{suffix}"),
                    &labelled,
                    stats::lift(&cl, &lm)?,
                );
                if !ctrl.is_empty() {
                    let v = stats::control_lift(&cl, &lm, &gather(&ctrl))?;
                    push(arm, format!("label-control-lift{suffix}"), &labelled, v);
                }
            }
        }
    }
    skipped.extend(coverage);
    Ok(Evaluation {
        feature_ids,
        labels,
        scores,
        arms,
        skipped,
    })
}

/// Add the AR's reconstruction scores of one arm's `features`: `ar-cosine` and `ar-fve`.
pub fn add_ar_scores(
    ev: &mut Evaluation,
    arm: &Arm,
    features: &[usize],
    scores: &[crate::reconstructor::ArScore],
    opts: &EvalOptions,
) {
    for (metric, values) in [
        (
            "ar-cosine",
            scores.iter().map(|s| s.cosine).collect::<Vec<_>>(),
        ),
        ("ar-fve", scores.iter().map(|s| s.fve).collect()),
    ] {
        match stats::summarize(&values, opts.ci_level, opts.resamples, opts.seed) {
            Ok(summary) => ev.scores.push(Scored {
                arm: arm.clone(),
                metric: metric.into(),
                summary,
                features: features.to_vec(),
                values,
            }),
            Err(e) => ev.skipped.push((arm.name(), metric.into(), e.to_string())),
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG document of w x h with a title line (closed by the caller).
fn svg_open(w: f64, h: f64, title: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><text x="10" y="20" font-size="14">{}</text>"#,
        esc(title)
    )
}

/// Per-feature values of the chosen metrics as strips of dots with the mean and its t CI: one row per (arm,
/// metric).
pub fn strip_plot_svg(title: &str, rows: &[&Scored]) -> String {
    let (w, row_h, left, right, top) = (760.0, 34.0, 250.0, 20.0, 40.0);
    let h = top + row_h * rows.len() as f64 + 40.0;
    let all = rows.iter().flat_map(|s| s.values.iter().copied());
    let (mut lo, mut hi) = all.fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let pad = ((hi - lo) * 0.05).max(0.01);
    lo -= pad;
    hi += pad;
    let x = |v: f64| left + (v - lo) / (hi - lo) * (w - left - right);
    let mut s = svg_open(w, h, title);
    let _ = write!(
        s,
        r##"<line x1="{0:.1}" y1="{top}" x2="{0:.1}" y2="{1:.1}" stroke="#999" stroke-dasharray="4 3"/>"##,
        x(0.0),
        h - 30.0
    );
    for (i, r) in rows.iter().enumerate() {
        let y = top + row_h * (i as f64 + 0.5);
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{} · {}</text>"#,
            left - 8.0,
            y + 4.0,
            esc(&r.arm.name()),
            esc(&r.metric)
        );
        for v in &r.values {
            let _ = write!(
                s,
                r##"<circle cx="{:.1}" cy="{y:.1}" r="2.5" fill="#4477aa" fill-opacity="0.5"/>"##,
                x(*v)
            );
        }
        let (a, b) = r.summary.t_ci;
        let _ = write!(
            s,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#cc3311" stroke-width="3"/><line x1="{m:.1}" y1="{:.1}" x2="{m:.1}" y2="{:.1}" stroke="#cc3311" stroke-width="3"/>"##,
            x(a),
            x(b),
            y - 9.0,
            y + 9.0,
            m = x(r.summary.mean)
        );
    }
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{v:.2}</text>"#,
            x(v),
            h - 12.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Mean (with t CI) of each metric against the washout weight (w = 0 is plain cross).
pub fn sweep_svg(title: &str, series: &[(String, Vec<(f64, &Summary)>)]) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 360.0, 60.0, 200.0, 40.0, 40.0);
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x_hi, mut lo, mut hi) = (0.0f64, 0.0f64, 0.0f64);
    for (wt, s) in points {
        x_hi = x_hi.max(*wt);
        lo = lo.min(s.t_ci.0);
        hi = hi.max(s.t_ci.1);
    }
    let x_hi = if x_hi > 0.0 { x_hi } else { 1.0 };
    let pad = ((hi - lo) * 0.05).max(0.01);
    let (lo, hi) = (lo - pad, hi + pad);
    let x = |v: f64| left + v / x_hi * (w - left - right);
    let y = |v: f64| top + (hi - v) / (hi - lo) * (h - top - bottom);
    let colors = [
        "#4477aa", "#cc3311", "#228833", "#aa3377", "#ee7733", "#66ccee",
    ];
    let mut s = svg_open(w, h, title);
    let _ = write!(
        s,
        r##"<line x1="{left}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#999" stroke-dasharray="4 3"/>"##,
        y(0.0),
        w - right
    );
    for (k, (name, pts)) in series.iter().enumerate() {
        let c = colors[k % colors.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(wt, sm)| format!("{:.1},{:.1}", x(*wt), y(sm.mean)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for (wt, sm) in pts {
            let _ = write!(
                s,
                r#"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="{c}"/><circle cx="{0:.1}" cy="{3:.1}" r="3" fill="{c}"/>"#,
                x(*wt),
                y(sm.t_ci.0),
                y(sm.t_ci.1),
                y(sm.mean)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="{c}">{}</text>"#,
            w - right + 10.0,
            top + 16.0 * (k as f64 + 1.0),
            esc(name)
        );
    }
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{v:.2}</text>"#,
            left - 6.0,
            y(v) + 4.0
        );
    }
    let mut ws: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(wt, _)| *wt))
        .collect();
    ws.sort_by(f64::total_cmp);
    ws.dedup();
    for wt in ws {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{wt}</text>"#,
            x(wt),
            h - bottom + 16.0
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">washout weight w (0 = cross without washout)</text>"#,
        (left + w - right) / 2.0,
        h - 6.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::tests::record;

    /// A stand-in embedder: one fixed random unit vector per distinct text.
    fn embed(texts: &[String]) -> Result<Matrix> {
        let d = 16;
        let mut data = Vec::with_capacity(texts.len() * d);
        for t in texts {
            let seed = t
                .bytes()
                .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
            let mut rng = avb_core::rng::SplitMix64::new(seed);
            let v: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            data.extend(v.iter().map(|x| x / n));
        }
        Ok(Matrix::new(texts.len(), d, data))
    }

    #[test]
    fn partial_arms_and_unlabelled_features_stay_aligned() {
        let labels = [None, Some("music"), Some("war"), Some("food")];
        let mut records = Vec::new();
        for (i, l) in labels.iter().enumerate() {
            records.push(record(
                Condition::Native,
                &i.to_string(),
                *l,
                &format!("native {i}"),
            ));
            // Feature 3 has no cross explanation yet (an interrupted run).
            if i < 3 {
                records.push(record(
                    Condition::Cross,
                    &i.to_string(),
                    *l,
                    &format!("native {i}"),
                ));
            }
        }
        let ev = evaluate(
            &records,
            &mut embed,
            &EvalOptions {
                ci_level: 0.95,
                resamples: 100,
                seed: 0,
            },
        )
        .unwrap();
        let cross = Arm {
            condition: Condition::Cross,
            washout_weight: None,
        };
        // Cross copies native word for word: label cosine of feature 1 equals native's, at feature 1.
        let native = Arm {
            condition: Condition::Native,
            washout_weight: None,
        };
        let lc = ev.find(&cross, "label-cosine").unwrap();
        assert_eq!(lc.features, vec![1, 2]);
        assert_eq!(
            lc.value_of(1),
            ev.find(&native, "label-cosine").unwrap().value_of(1)
        );
        assert_eq!(lc.value_of(0), None);
        // Lift over the three features both arms have, and the gap reported.
        let lift = ev.find(&cross, "lift").unwrap();
        assert_eq!(lift.features, vec![0, 1, 2]);
        assert!(ev.skipped.iter().any(|(arm, m, why)| arm == "cross"
            && m.starts_with("lift")
            && why.contains("3 of 4")));
    }
}
