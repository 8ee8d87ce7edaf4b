//! avbridge in the browser: a wasm-bindgen API over the runtime and verbalizer code the native `avb` runs, on
//! WebGPU. The page's loader (web/avb.js) downloads a web bundle's files (progress, Cache Storage) and hands their
//! bytes here; the sha256 checks, the model, the prompt protocol, the cross-model step (ridge map and washout,
//! through avb-nla's `plan`) and decoding are the same Rust code as the CLI's. Built only for wasm32.
#![cfg(target_arch = "wasm32")]

use avb_core::artifact::{
    check_map_for_verbalizer, check_washout_for_map, sha256_hex, Artifact, Body, Space,
};
use avb_core::io::{BytesSource, RangeSource};
use avb_core::ridge::AffineMap;
use avb_core::AvbError;
use avb_model::bundle::{Bits, Bundle, Manifest};
use avb_nla::explain::Condition;
use avb_nla::{NlaMeta, Verbalizer};
use avb_runtime::cross::{checked_rows, DeviceMap};
use avb_runtime::loader::{tokenizer_and_template, LoadedModel};
use avb_runtime::weights::WeightSource;
use avb_runtime::{
    generate_async, Control, Device, GenerateOptions, Input, Model, Precision, Sampling,
};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wasm_bindgen::prelude::*;

fn js_err(e: AvbError) -> JsError {
    JsError::new(&e.to_string())
}

thread_local! {
    static DEVICE: RefCell<Option<Device>> = const { RefCell::new(None) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn console_error(message: &str);
}

/// A panic in wasm surfaces in JS as a bare `RuntimeError: unreachable`; keep its message (wgpu reports GPU
/// out-of-memory and device loss this way) so the page can say what happened.
#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        let message = info.to_string();
        console_error(&message);
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(message));
    }));
}

/// The message of the panic that stopped the module, if one did (the module cannot be used after it).
#[wasm_bindgen(js_name = lastPanic)]
pub fn last_panic() -> Option<String> {
    LAST_PANIC.with(|p| p.borrow().clone())
}

/// Acquire the WebGPU device once; later calls reuse it.
#[wasm_bindgen(js_name = initGpu)]
pub async fn init_gpu() -> Result<(), JsError> {
    if DEVICE.with(|d| d.borrow().is_some()) {
        return Ok(());
    }
    let device = Device::wgpu_options().init_async().await.map_err(|e| {
        JsError::new(&format!(
            "WebGPU is not available here ({e}). Use a browser with WebGPU enabled (Chrome or Edge 113+; Chromium with --enable-unsafe-webgpu)."
        ))
    })?;
    DEVICE.with(|d| *d.borrow_mut() = Some(device));
    Ok(())
}

fn device() -> Result<Device, JsError> {
    DEVICE
        .with(|d| d.borrow().clone())
        .ok_or_else(|| JsError::new("the GPU is not initialised: await initGpu() first"))
}

/// A bundle file as the page holds it, a Uint8Array in JS memory: a read copies only the bytes asked for into wasm
/// memory, so the model is built tensor by tensor and wasm32's 4 GiB never has to hold the whole bundle.
struct JsBytes {
    name: PathBuf,
    bytes: js_sys::Uint8Array,
}

impl RangeSource for JsBytes {
    fn len(&self) -> u64 {
        self.bytes.length() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> avb_core::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.len() {
            return Err(AvbError::truncated(
                &self.name,
                format!(
                    "needed bytes {offset}..{end} but only {} are present",
                    self.len()
                ),
            ));
        }
        self.bytes.subarray(offset as u32, end as u32).copy_to(buf);
        Ok(())
    }
    fn name(&self) -> &Path {
        &self.name
    }
}

/// Every file `manifest` lists, taken from a JS Map (file name -> Uint8Array) without copying it into wasm memory.
fn sources(
    manifest: &Manifest,
    files: &js_sys::Map,
) -> Result<BTreeMap<String, Box<dyn RangeSource>>, JsError> {
    let mut out: BTreeMap<String, Box<dyn RangeSource>> = BTreeMap::new();
    for name in manifest.files.keys() {
        let value = files.get(&JsValue::from_str(name));
        if !value.is_instance_of::<js_sys::Uint8Array>() {
            return Err(JsError::new(&format!(
                "{name} was not downloaded (expected its bytes as a Uint8Array)"
            )));
        }
        out.insert(
            name.clone(),
            Box::new(JsBytes {
                name: PathBuf::from(name),
                bytes: value.unchecked_into(),
            }),
        );
    }
    Ok(out)
}

/// A verbalizer from a web bundle that carries its sidecar.
#[wasm_bindgen]
pub struct WebVerbalizer {
    av: Verbalizer,
    precision: Precision,
}

#[wasm_bindgen]
impl WebVerbalizer {
    /// `manifest`: manifest.json's bytes; `files`: a Map from every file name it lists to that file's bytes;
    /// `precision`: "bundle" (the bundle's 8- or 4-bit weights) or "f32" (the same values in f32 storage, for
    /// adapters whose quantized kernels fail).
    pub fn open(
        manifest: &[u8],
        files: js_sys::Map,
        precision: &str,
    ) -> Result<WebVerbalizer, JsError> {
        let name = PathBuf::from("bundle");
        let manifest = Manifest::parse(manifest, &name.join("manifest.json")).map_err(js_err)?;
        let files = sources(&manifest, &files)?;
        let bundle = Bundle::from_sources(manifest, name.clone(), files).map_err(js_err)?;
        let sidecar = bundle.manifest.sidecar.clone().ok_or_else(|| {
            JsError::new("this bundle carries no verbalizer sidecar; pack it with `avb pack-web --profile ...`")
        })?;
        let text = bundle.text(&sidecar).map_err(js_err)?;
        let meta = NlaMeta::from_yaml(&text, &name.join(&sidecar)).map_err(js_err)?;
        if let Some(z) = &meta.avbridge {
            if z.model_sha256 != bundle.manifest.source.sha256 {
                return Err(JsError::new(&format!(
                    "the bundle's sidecar was measured on a model with sha256 {} but the bundle holds {}; repack it with a profile for this model",
                    z.model_sha256, bundle.manifest.source.sha256
                )));
            }
        }
        let precision = match (precision, bundle.manifest.precision) {
            ("f32", _) => Precision::F32,
            ("bundle", Bits::Q8) => Precision::Q8,
            ("bundle", Bits::Q4) => Precision::Q4,
            (other, _) => {
                return Err(JsError::new(&format!(
                    "precision `{other}`: use \"bundle\" or \"f32\""
                )))
            }
        };
        let model_name = bundle.manifest.source.name.clone();
        let (src, config) = WeightSource::from_bundle(bundle).map_err(js_err)?;
        let model = Model::from_source(&src, config, &device()?, precision).map_err(js_err)?;
        let (tokenizer, chat) = tokenizer_and_template(&src, &name).map_err(js_err)?;
        let lm = LoadedModel {
            name: model_name,
            path: name,
            model,
            tokenizer,
            chat,
        };
        let av = Verbalizer::new(meta, lm, sidecar, sha256_hex(text.as_bytes())).map_err(js_err)?;
        Ok(WebVerbalizer { av, precision })
    }

    /// Model, site and precision as JSON.
    pub fn info(&self) -> String {
        let c = &self.av.lm.model.config;
        serde_json::json!({
            "model": self.av.lm.name,
            "d_model": c.hidden_size,
            "layers": c.num_layers,
            "injection_layer": self.av.meta.injection_layer(),
            "injection_norm": self.av.meta.injection_norm(),
            "precision": format!("{:?}", self.precision).to_lowercase(),
        })
        .to_string()
    }

    /// Verbalize one vector of this model's residual space. `on_text(text)` sees the text so far after every
    /// token; returning `false` from it cancels. `temperature` 0 decodes greedily (the published examples' way);
    /// above 0 it samples with nucleus `top_p` from `seed`. Resolves to the explanation as JSON: the fields of a
    /// native `avb explain` record's explanation, and `steps` ({launched, replayed}: how its decoding steps ran;
    /// explanations running at once on one verbalizer count each other's steps too).
    pub async fn explain(
        &self,
        vector: Vec<f32>,
        max_new_tokens: u32,
        on_text: js_sys::Function,
        temperature: f32,
        top_p: f32,
        seed: u32,
    ) -> Result<String, JsError> {
        let mut opts = self.av.default_options();
        if max_new_tokens > 0 {
            opts.max_new_tokens = max_new_tokens as usize;
        }
        if temperature > 0.0 {
            opts.sampling = Sampling::TopP {
                temperature,
                top_p,
                seed: seed as u64,
            };
        }
        opts.batch_size = 1;
        let before = self.av.lm.model.decode_steps();
        let out = self
            .av
            .explain_async(&[vector], &opts, &mut |_, text| {
                control(on_text.call1(&JsValue::NULL, &JsValue::from_str(text)))
            })
            .await
            .map_err(js_err)?;
        let mut record = serde_json::to_value(&out[0]).map_err(|e| JsError::new(&e.to_string()))?;
        let steps = self.av.lm.model.decode_steps().since(before);
        record["steps"] = serde_json::json!(steps);
        Ok(record.to_string())
    }

    /// Greedy continuation of `prompt` (a user turn in the chat template when `chat`), what `avb generate`
    /// prints natively for the same bundle. `on_token(id)` sees every token; returning `false` cancels.
    /// Resolves to the generated ids.
    pub async fn generate(
        &self,
        prompt: &str,
        chat: bool,
        max_new_tokens: u32,
        on_token: js_sys::Function,
    ) -> Result<Vec<u32>, JsError> {
        let lm = &self.av.lm;
        let ids = lm.prompt_ids(prompt, chat).map_err(js_err)?;
        let opts = GenerateOptions {
            max_new_tokens: max_new_tokens as usize,
            sampling: Sampling::Greedy,
            stop_ids: lm.tokenizer.eos.into_iter().collect(),
            row_seeds: None,
            max_batch: None,
        };
        let out = generate_async(&lm.model, &[Input::ids(ids)], &opts, &mut |_, id| {
            control(on_token.call1(&JsValue::NULL, &JsValue::from(id)))
        })
        .await
        .map_err(js_err)?;
        Ok(out.into_iter().next().map(|g| g.ids).unwrap_or_default())
    }

    /// Text of token ids.
    pub fn decode(&self, ids: Vec<u32>) -> Result<String, JsError> {
        self.av.lm.tokenizer.decode(&ids).map_err(js_err)
    }
}

/// A callback's answer: `false` stops, anything else (or a throw) goes on.
fn control(answer: Result<JsValue, JsValue>) -> Control {
    match answer {
        Ok(v) if v == JsValue::FALSE => Control::Stop,
        _ => Control::Continue,
    }
}

/// The cross-model step on the GPU: a ridge map from the feature model's residual space into the AV's, and the AV
/// model's washout vector, held on the device (the CLI's host planner computes the same vectors; tests hold the
/// two equal).
#[wasm_bindgen]
pub struct CrossMap {
    map: DeviceMap,
    target: Space,
}

fn artifact(bytes: Vec<u8>, name: &str) -> Result<Artifact, JsError> {
    let a = Artifact::from_source(Box::new(BytesSource::new(name, bytes))).map_err(js_err)?;
    a.verify().map_err(js_err)?;
    Ok(a)
}

#[wasm_bindgen]
impl CrossMap {
    /// A ridge-map artifact (`avb fit-map`) and optionally a washout artifact (`avb washout`), as bytes.
    pub fn open(map: Vec<u8>, washout: Option<Vec<u8>>) -> Result<CrossMap, JsError> {
        let art = artifact(map, "map.safetensors")?;
        let Body::RidgeMap(meta) = art.meta.body.clone() else {
            return Err(JsError::new(
                "the map file is not a ridge_map artifact (make one with `avb fit-map`)",
            ));
        };
        let weight = art.read_matrix("weight").map_err(js_err)?;
        let (_, bias) = art.read_tensor("bias").map_err(js_err)?;
        let washout = match washout {
            Some(bytes) => {
                let w = artifact(bytes, "washout.safetensors")?;
                let Body::Washout(wm) = w.meta.body.clone() else {
                    return Err(JsError::new(
                        "the washout file is not a washout artifact (make one with `avb washout`)",
                    ));
                };
                check_washout_for_map(&wm.space, &meta.target).map_err(js_err)?;
                Some(w.read_tensor("washout").map_err(js_err)?.1)
            }
            None => None,
        };
        let map = DeviceMap::new(&AffineMap { weight, bias }, washout.as_deref(), &device()?)
            .map_err(js_err)?;
        Ok(CrossMap {
            map,
            target: meta.target,
        })
    }

    /// The vector the AV reads for `direction` (a feature's decoder row in the source space) under `condition`
    /// ("cross", or "cross-washout" with `washout_weight`), computed on the GPU.
    pub async fn vector(
        &self,
        direction: Vec<f32>,
        condition: &str,
        washout_weight: f64,
    ) -> Result<Vec<f32>, JsError> {
        let weight = match Condition::parse(condition).map_err(js_err)? {
            Condition::Cross => None,
            Condition::CrossWashout => Some(washout_weight),
            other => {
                return Err(JsError::new(&format!(
                    "condition {} does not go through a map; use cross or cross-washout",
                    other.name()
                )))
            }
        };
        let d = direction.len();
        let rows = avb_core::matrix::Matrix::new(1, d, direction);
        let values = self
            .map
            .vectors(&rows, weight)
            .map_err(js_err)?
            .into_data_async()
            .await
            .map_err(|e| JsError::new(&format!("reading the mapped vector back failed: {e:?}")))?
            .try_into_vec::<f32>()
            .map_err(|e| JsError::new(&format!("the mapped vector is not f32: {e:?}")))?;
        let mut rows = checked_rows(values, self.map.d_tgt()).map_err(js_err)?;
        Ok(rows.remove(0))
    }

    /// Refuse a verbalizer that does not read the residual stream this map lands in (model, layer, width).
    #[wasm_bindgen(js_name = checkVerbalizer)]
    pub fn check_verbalizer(&self, av: &WebVerbalizer) -> Result<(), JsError> {
        check_map_for_verbalizer(&self.target, &av.av.space()).map_err(js_err)
    }

    #[wasm_bindgen(getter, js_name = dSource)]
    pub fn d_source(&self) -> usize {
        self.map.d_src()
    }

    #[wasm_bindgen(getter, js_name = dTarget)]
    pub fn d_target(&self) -> usize {
        self.map.d_tgt()
    }
}

/// A feature file read row by row over HTTP ranges (an SAE's `sae_weights.safetensors` with its `cfg.json`, a
/// GemmaScope `params.safetensors`, a direction .safetensors or .npy): the page fetches the header and single rows;
/// the format detection, checks and decoding are avb-core's, as for local files.
#[wasm_bindgen]
pub struct RemoteFeatures {
    source: avb_core::features::FeatureSource,
}

#[wasm_bindgen]
impl RemoteFeatures {
    /// How many bytes from the start of the file hold its header, given at least its first 12; 0 when the bytes
    /// are neither safetensors nor .npy.
    #[wasm_bindgen(js_name = headerBytes)]
    pub fn header_bytes(prefix: &[u8]) -> f64 {
        avb_core::features::header_extent(prefix).map_or(0.0, |n| n as f64)
    }

    /// `name`: the file name (its extension picks the format); `length`: the file's size; `prefix`: at least its
    /// first `headerBytes` bytes; `saelens_cfg`: the SAE's cfg.json text, if it is one.
    pub fn open(
        name: &str,
        length: f64,
        prefix: Vec<u8>,
        saelens_cfg: Option<String>,
    ) -> Result<RemoteFeatures, JsError> {
        let source = avb_core::features::FeatureSource::from_prefix(
            name,
            length as u64,
            prefix,
            saelens_cfg.as_deref(),
        )
        .map_err(js_err)?;
        Ok(RemoteFeatures { source })
    }

    #[wasm_bindgen(getter)]
    pub fn count(&self) -> usize {
        self.source.len()
    }

    #[wasm_bindgen(getter)]
    pub fn d(&self) -> usize {
        self.source.d()
    }

    /// Byte range `[start, end)` of feature row `row` in the file (an HTTP Range of `bytes=start-(end-1)`).
    #[wasm_bindgen(js_name = rowRange)]
    pub fn row_range(&self, row: usize) -> Result<Vec<f64>, JsError> {
        let (start, end) = self.source.row_range(row).map_err(js_err)?;
        Ok(vec![start as f64, end as f64])
    }

    /// Feature row `row` from the bytes of its range.
    #[wasm_bindgen(js_name = decodeRow)]
    pub fn decode_row(&self, row: usize, bytes: &[u8]) -> Result<Vec<f32>, JsError> {
        self.source.decode_row(row, bytes).map_err(js_err)
    }
}
