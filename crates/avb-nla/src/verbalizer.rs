//! An activation verbalizer: a decoder plus its sidecar (a trained AV's `nla_meta.yaml` or a zero-shot profile),
//! explaining vectors in batches.

use crate::profiles;
use crate::protocol::{self, AvPrompt, ParseStatus};
use crate::sidecar::{NlaMeta, Role};
use avb_core::artifact::{file_sha256, Space};
use avb_core::{AvbError, Result};
use avb_model::bundle;
use avb_model::registry;
use avb_model::tokenizer::StreamDecoder;
use avb_runtime::loader::{self, LoadedModel};
use avb_runtime::{
    Control, Decoder, Device, Finish, GenerateOptions, Generation, Injection, Input, Precision,
    Sampling,
};
use serde::Serialize;
use std::path::{Path, PathBuf};

pub struct Verbalizer {
    pub meta: NlaMeta,
    pub lm: LoadedModel,
    pub prompt: AvPrompt,
    /// Where the sidecar came from (a file, or `builtin:<name>` for a shipped profile) and its sha256.
    pub sidecar: String,
    pub sidecar_sha256: String,
}

#[derive(Clone, Debug)]
pub struct ExplainOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub batch_size: usize,
    /// One sampling seed per vector (e.g. derived from the job's key), so that a sampled explanation does not
    /// depend on the batch it lands in or on where a resumed run starts. Unused when greedy.
    pub seeds: Option<Vec<u64>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// What the model generated, up to and including a stop string.
    pub raw: String,
    pub explanation: String,
    pub last_paragraph: String,
    pub parse: ParseStatus,
    pub tokens: usize,
    pub finish: &'static str,
}

/// The sidecar and the model location named by `spec`: an AV checkpoint directory holding `nla_meta.yaml`, a
/// sidecar / profile `.yaml` file, or the registry name of a model with a shipped zero-shot profile.
pub fn resolve_sidecar(spec: &str) -> Result<(NlaMeta, String, String, String)> {
    let p = Path::new(spec);
    if p.is_dir() {
        let side = p.join("nla_meta.yaml");
        if !side.exists() {
            return Err(AvbError::Invalid(format!(
                "{spec} has no nla_meta.yaml: it is not an NLA checkpoint (for a model without a trained AV, make a profile with `avb profile`)"
            )));
        }
        let meta = NlaMeta::read(&side)?;
        return Ok((
            meta,
            side.display().to_string(),
            file_sha256(&side)?,
            spec.to_string(),
        ));
    }
    if p.is_file() {
        let meta = NlaMeta::read(p)?;
        let model = model_of(&meta, p)?;
        return Ok((meta, spec.to_string(), file_sha256(p)?, model));
    }
    match profiles::builtin(spec) {
        Some(text) => {
            let name = PathBuf::from(format!("builtin:{spec}"));
            let meta = NlaMeta::from_yaml(text, &name)?;
            let model = model_of(&meta, &name)?;
            Ok((
                meta,
                name.display().to_string(),
                avb_core::artifact::sha256_hex(text.as_bytes()),
                model,
            ))
        }
        None => Err(AvbError::Invalid(format!(
            "`{spec}` is not an AV checkpoint directory, a sidecar file, or a model with a shipped profile ({})",
            profiles::names().join(", ")
        ))),
    }
}

/// The model a sidecar file describes: a profile names it; a trained AV's sidecar sits in its checkpoint.
fn model_of(meta: &NlaMeta, sidecar: &Path) -> Result<String> {
    if let Some(z) = &meta.avbridge {
        return Ok(z.model.clone());
    }
    sidecar
        .parent()
        .filter(|d| d.join("config.json").exists())
        .map(|d| d.display().to_string())
        .ok_or_else(|| {
            AvbError::Invalid(format!(
                "{}: a trained AV's sidecar must sit in its checkpoint directory (config.json, safetensors)",
                sidecar.display()
            ))
        })
}

/// A profile's scale was measured on one model file: refuse another one (a re-quantized or different checkpoint
/// under the same name). Registry models are compared by their recorded sha256 (verified when fetched), web
/// bundles by the sha256 of the model they were packed from.
fn check_profile_model(meta: &NlaMeta, model: &str, sidecar: &str) -> Result<()> {
    let Some(z) = &meta.avbridge else {
        return Ok(());
    };
    let path = Path::new(model);
    let actual = if path.is_file() {
        file_sha256(path)?
    } else if bundle::is_bundle_dir(path) {
        bundle::read_manifest(path)?.source.sha256
    } else if let Ok(a) = registry::find(model) {
        match a.files.first().and_then(|f| f.sha256.clone()) {
            Some(h) => h,
            None => return Ok(()),
        }
    } else {
        return Ok(());
    };
    if actual != z.model_sha256 {
        return Err(AvbError::Invalid(format!(
            "{sidecar} was measured on a model with sha256 {} but {model} has sha256 {actual}; make a profile for this model with `avb profile --model {model}`",
            z.model_sha256
        )));
    }
    Ok(())
}

impl Verbalizer {
    pub fn open(spec: &str, device: &Device, precision: Precision) -> Result<Verbalizer> {
        let (meta, sidecar, sidecar_sha256, model) = resolve_sidecar(spec)?;
        if meta.role != Role::Av {
            return Err(AvbError::Invalid(format!(
                "{sidecar} describes an activation reconstructor (role: ar); explaining needs a verbalizer (role: av)"
            )));
        }
        check_profile_model(&meta, &model, &sidecar)?;
        let lm = loader::open(&model, device, precision)?;
        Verbalizer::new(meta, lm, sidecar, sidecar_sha256)
    }

    pub fn new(
        meta: NlaMeta,
        lm: LoadedModel,
        sidecar: String,
        sidecar_sha256: String,
    ) -> Result<Verbalizer> {
        let c = &lm.model.config;
        if meta.d_model != c.hidden_size {
            return Err(AvbError::dimension(
                sidecar.as_str(),
                format!(
                    "d_model {} but the model {} has hidden size {}",
                    meta.d_model, lm.name, c.hidden_size
                ),
                "use the sidecar that belongs to this model",
            ));
        }
        if meta.injection_layer() >= c.num_layers {
            return Err(AvbError::Invalid(format!(
                "{sidecar}: injection at the input of block {} but {} has {} blocks",
                meta.injection_layer(),
                lm.name,
                c.num_layers
            )));
        }
        let prompt = protocol::build_prompt(&meta, &lm.tokenizer, lm.chat.as_ref(), 1)?;
        Ok(Verbalizer {
            meta,
            lm,
            prompt,
            sidecar,
            sidecar_sha256,
        })
    }

    /// The residual-stream site this verbalizer reads: its model at the extraction layer.
    pub fn space(&self) -> Space {
        Space {
            model: self.lm.name.clone(),
            layer: Some(self.meta.extraction_layer_index as u32),
            d: self.meta.d_model,
        }
    }

    pub fn default_options(&self) -> ExplainOptions {
        ExplainOptions {
            max_new_tokens: self.meta.max_new_tokens(),
            sampling: Sampling::Greedy,
            batch_size: 16,
            seeds: None,
        }
    }

    /// The model input that verbalizes `vector`: the prompt with the rescaled vector at its site.
    pub fn input(&self, vector: &[f32]) -> Result<Input> {
        if vector.len() != self.meta.d_model {
            return Err(AvbError::dimension(
                "vector to verbalize",
                format!(
                    "{} values; the verbalizer {} reads vectors of d_model {}",
                    vector.len(),
                    self.lm.name,
                    self.meta.d_model
                ),
                "map the features into this model's residual space (avb map / --map) first",
            ));
        }
        let v = protocol::rescale(vector, self.meta.injection_norm())?;
        Ok(Input {
            ids: self.prompt.ids.clone(),
            injections: vec![Injection {
                position: self.prompt.sites[0],
                layer: self.meta.injection_layer(),
                vector: v,
            }],
        })
    }

    fn check_request(&self, vectors: &[Vec<f32>], opts: &ExplainOptions) -> Result<()> {
        if opts.max_new_tokens == 0 {
            return Err(AvbError::Invalid(
                "a token budget of 0 would write empty explanations".into(),
            ));
        }
        if let Some(seeds) = &opts.seeds {
            if seeds.len() != vectors.len() {
                return Err(AvbError::Invalid(format!(
                    "{} seeds for {} vectors",
                    seeds.len(),
                    vectors.len()
                )));
            }
        }
        Ok(())
    }

    /// Every vector's input, the generation options (`batch_size` rows at once, refilled as they finish) and
    /// the streaming state.
    fn decoding(
        &self,
        vectors: &[Vec<f32>],
        opts: &ExplainOptions,
    ) -> Result<(Vec<Input>, GenerateOptions, Streams<'_>)> {
        let gen = GenerateOptions {
            max_new_tokens: opts.max_new_tokens,
            sampling: opts.sampling.clone(),
            stop_ids: self.lm.tokenizer.end_of_turn_ids(),
            row_seeds: opts.seeds.clone(),
            max_batch: Some(opts.batch_size.max(1)),
        };
        let inputs = vectors
            .iter()
            .map(|v| self.input(v))
            .collect::<Result<Vec<_>>>()?;
        let streams = Streams {
            verbalizer: self,
            stops: self.meta.stop_strings(),
            stop_ids: gen.stop_ids.clone(),
            decoders: vectors
                .iter()
                .map(|_| StreamDecoder::new(&self.lm.tokenizer))
                .collect(),
            texts: vec![String::new(); vectors.len()],
            failure: None,
        };
        Ok((inputs, gen, streams))
    }

    /// Explain every vector, `batch_size` at a time, finished rows taking the next vectors while the others go on;
    /// `on_done(index, explanation)` runs as each explanation finishes (for resumable output).
    pub fn explain(
        &self,
        vectors: &[Vec<f32>],
        opts: &ExplainOptions,
        on_done: &mut dyn FnMut(usize, &Explanation) -> Result<()>,
    ) -> Result<Vec<Explanation>> {
        self.check_request(vectors, opts)?;
        let (inputs, gen, mut streams) = self.decoding(vectors, opts)?;
        let mut out = vec![None; vectors.len()];
        let mut decoder = Decoder::new(&self.lm.model, &inputs, &gen)?;
        while let Some(readback) = decoder.readback() {
            decoder.advance(readback.read()?, &mut |i, id| streams.on_token(i, id))?;
            for (i, g) in decoder.take_finished() {
                let e = streams.finish(i, &g)?;
                on_done(i, &e)?;
                out[i] = Some(e);
            }
        }
        collect_all(out)
    }

    /// `explain` with asynchronous device reads (the browser's path). `on_text(index, text)` sees each vector's
    /// text so far after every token; returning `Control::Stop` cancels that explanation.
    pub async fn explain_async(
        &self,
        vectors: &[Vec<f32>],
        opts: &ExplainOptions,
        on_text: &mut dyn FnMut(usize, &str) -> Control,
    ) -> Result<Vec<Explanation>> {
        self.check_request(vectors, opts)?;
        let (inputs, gen, mut streams) = self.decoding(vectors, opts)?;
        let mut out = vec![None; vectors.len()];
        let mut cancelled = vec![false; vectors.len()];
        let mut decoder = Decoder::new(&self.lm.model, &inputs, &gen)?;
        while let Some(readback) = decoder.readback() {
            decoder.advance(readback.read_async().await?, &mut |i, id| match streams
                .on_token(i, id)
            {
                Control::Continue => {
                    let control = on_text(i, streams.text(i));
                    cancelled[i] = control == Control::Stop;
                    control
                }
                Control::Stop => Control::Stop,
            })?;
            for (i, g) in decoder.take_finished() {
                let mut e = streams.finish(i, &g)?;
                if cancelled[i] {
                    e.finish = "cancelled";
                }
                out[i] = Some(e);
            }
        }
        collect_all(out)
    }
}

/// Every vector's explanation, once decoding is over (every input finishes before it ends).
fn collect_all(out: Vec<Option<Explanation>>) -> Result<Vec<Explanation>> {
    out.into_iter()
        .map(|e| {
            e.ok_or_else(|| {
                AvbError::Invalid("decoding ended before every vector was explained".into())
            })
        })
        .collect()
}

/// The streaming state of every vector: incremental detokenization and stop strings.
struct Streams<'v> {
    verbalizer: &'v Verbalizer,
    stops: Vec<String>,
    stop_ids: Vec<u32>,
    decoders: Vec<StreamDecoder<'v>>,
    texts: Vec<String>,
    failure: Option<AvbError>,
}

impl Streams<'_> {
    /// Append vector i's new token to its text; stop it at a stop string (the text keeps it).
    fn on_token(&mut self, i: usize, id: u32) -> Control {
        if self.stop_ids.contains(&id) {
            return Control::Continue;
        }
        match self.decoders[i].push(id) {
            Ok(piece) => self.texts[i].push_str(&piece),
            Err(e) => {
                self.failure = Some(e);
                return Control::Stop;
            }
        }
        let text = &mut self.texts[i];
        match self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()).map(|at| at + s.len()))
            .min()
        {
            Some(end) => {
                text.truncate(end);
                Control::Stop
            }
            None => Control::Continue,
        }
    }

    fn text(&self, i: usize) -> &str {
        &self.texts[i]
    }

    /// The explanation of a finished vector (its text moves into it).
    fn finish(&mut self, i: usize, g: &Generation) -> Result<Explanation> {
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        if g.finish != Finish::Callback {
            let tail = self.decoders[i].finish()?;
            self.texts[i].push_str(&tail);
        }
        let raw = std::mem::take(&mut self.texts[i]);
        let (explanation, parse) =
            protocol::parse_explanation(&raw, self.verbalizer.meta.explanation_tags());
        Ok(Explanation {
            last_paragraph: protocol::last_paragraph(&explanation),
            explanation,
            raw,
            parse,
            tokens: g.ids.len(),
            finish: match g.finish {
                Finish::StopToken => "stop_token",
                Finish::Length => "length",
                Finish::Callback => "stop_string",
            },
        })
    }
}
