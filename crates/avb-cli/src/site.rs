//! `avb site build` / `avb site serve`: a static feature site (index, one page per feature, the browser runtime and
//! the verbalizer bundle) that any static host can serve, and a local preview server on 127.0.0.1.

use crate::nla_cmds::load_inputs;
use avb_core::artifact::{check_map_for_verbalizer, file_sha256, Space};
use avb_core::error::{AvbError, Result};
use avb_core::io::{build_dir_atomic, write_atomic};
use avb_model::bundle::{read_manifest, Manifest, MANIFEST};
use avb_nla::explain::Feature;
use avb_nla::verbalizer::resolve_sidecar;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

const FEATURE_PAGE: &str = include_str!("../../../web/site/feature.html");
const INDEX_PAGE: &str = include_str!("../../../web/site/index.html");
const SITE_CSS: &str = include_str!("../../../web/site/site.css");
const AVB_JS: &str = include_str!("../../../web/avb.js");
const WIDGET_JS: &str = include_str!("../../../web/av-explain.js");
/// What wasm-bindgen writes for crates/avb-web (`bash web/build-pkg.sh`).
const PKG_FILES: [&str; 2] = ["avb_web.js", "avb_web_bg.wasm"];

#[derive(clap::Subcommand, Debug)]
pub enum SiteCommand {
    /// Write a static site: index, one page per feature with <av-explain> widgets, the wasm runtime, the bundle.
    Build(Box<SiteBuildArgs>),
    /// Serve a built site on 127.0.0.1 for a local preview (GET/HEAD with byte ranges).
    Serve(SiteServeArgs),
}

#[derive(clap::Args, Debug)]
pub struct SiteBuildArgs {
    /// The verbalizer's web bundle (from `avb pack-web`, with a sidecar); it is checked and copied into the site.
    #[arg(long)]
    pub bundle: PathBuf,
    /// Pages load the bundle from this URL instead of a copy in the site (the bundle is still checked locally).
    #[arg(long)]
    pub bundle_url: Option<String>,
    /// Features: an SAELens directory, a direction file, a concept_directions or mapped_features artifact.
    #[arg(long)]
    pub features: PathBuf,
    /// Only these feature rows (e.g. 0..45 or 3,7,9); default all.
    #[arg(long)]
    pub ids: Option<String>,
    /// Ridge map from the features' space to the verbalizer's (for features of another model).
    #[arg(long)]
    pub map: Option<PathBuf>,
    /// Washout of the verbalizer's space: adds a cross-washout panel.
    #[arg(long)]
    pub washout: Option<PathBuf>,
    #[arg(long, default_value_t = 1.0)]
    pub washout_weight: f64,
    /// How pages get their feature's row: `range` copies the feature file into the site and the widget fetches
    /// one row by HTTP range; `inline` writes each row into its page's JSON. Default: range for SAEs, else inline.
    #[arg(long, value_enum)]
    pub rows: Option<RowsArg>,
    /// Token budget of each explanation (default: the sidecar's).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// The wasm-bindgen output of crates/avb-web.
    #[arg(long, default_value = "pkg")]
    pub pkg: PathBuf,
    #[arg(long, default_value = "avbridge features")]
    pub title: String,
    /// The site directory to create (it must not exist yet).
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum RowsArg {
    Range,
    Inline,
}

#[derive(clap::Args, Debug)]
pub struct SiteServeArgs {
    /// A directory written by `avb site build`.
    pub dir: PathBuf,
    /// 0 picks a free port.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
}

pub fn run(c: SiteCommand) -> Result<()> {
    match c {
        SiteCommand::Build(a) => build(*a),
        SiteCommand::Serve(a) => serve(a),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fill(template: &str, slots: &[(&str, String)]) -> String {
    slots
        .iter()
        .fold(template.to_string(), |page, (slot, value)| {
            page.replace(&format!("{{{{{slot}}}}}"), value)
        })
}

/// The verbalizer a bundle carries: its manifest and the residual-stream site its sidecar reads.
fn bundle_av(dir: &Path) -> Result<(Manifest, Space, String)> {
    let manifest = read_manifest(dir)?;
    if manifest.sidecar.is_none() {
        return Err(AvbError::Invalid(format!(
            "{}: the bundle carries no verbalizer sidecar. Fix: pack it with `avb pack-web --profile NAME|FILE`",
            dir.display()
        )));
    }
    let (meta, _, _, _) = resolve_sidecar(&dir.display().to_string())?;
    let space = Space {
        model: manifest.source.name.clone(),
        layer: Some(meta.extraction_layer_index as u32),
        d: meta.d_model,
    };
    let name = format!("{} ({})", manifest.source.name, manifest.precision.name());
    Ok((manifest, space, name))
}

/// Copy the bundle's files, checking each against the manifest's size and sha256.
fn copy_bundle(dir: &Path, manifest: &Manifest, out: &Path) -> Result<u64> {
    std::fs::create_dir_all(out).map_err(|e| AvbError::io(out, e))?;
    let mut total = 0;
    for (file, entry) in &manifest.files {
        let (from, to) = (dir.join(file), out.join(file));
        std::fs::copy(&from, &to).map_err(|e| AvbError::io(&from, e))?;
        let (bytes, sha) = (
            std::fs::metadata(&to)
                .map_err(|e| AvbError::io(&to, e))?
                .len(),
            file_sha256(&to)?,
        );
        if bytes != entry.bytes || sha != entry.sha256 {
            return Err(AvbError::Invalid(format!(
                "{}: {bytes} bytes with sha256 {sha}, but the manifest lists {} bytes with sha256 {}. Fix: pack the bundle again with `avb pack-web`",
                from.display(),
                entry.bytes,
                entry.sha256
            )));
        }
        total += bytes;
    }
    let manifest_path = dir.join(MANIFEST);
    std::fs::copy(&manifest_path, out.join(MANIFEST))
        .map_err(|e| AvbError::io(&manifest_path, e))?;
    Ok(total)
}

/// A hard link where the file system allows one (SAE weights can be gigabytes), else a copy.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| AvbError::io(from, e))
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

fn stats_rows(f: &Feature) -> String {
    let mut top: Vec<(usize, f32)> = f.vector.iter().copied().enumerate().collect();
    top.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    let top: Vec<String> = top
        .iter()
        .take(5)
        .map(|(i, v)| format!("{i}: {v:.3}"))
        .collect();
    [
        ("decoder norm", format!("{:.4}", norm(&f.vector))),
        ("largest components", top.join(", ")),
    ]
    .iter()
    .map(|(k, v)| format!("<tr><td>{k}</td><td>{}</td></tr>", escape(v)))
    .collect()
}

fn feature_file(f: &Feature) -> String {
    // Feature ids are row ids of the source; keep file names to safe characters whatever they are.
    let id: String =
        f.id.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
    format!("feature-{id}")
}

fn build(a: SiteBuildArgs) -> Result<()> {
    if a.output.exists() {
        return Err(AvbError::Invalid(format!(
            "{} already exists. Fix: remove it or choose another --output",
            a.output.display()
        )));
    }
    if !(a.washout_weight.is_finite() && a.washout_weight >= 0.0) {
        return Err(AvbError::Invalid(format!(
            "--washout-weight {} is not a number >= 0",
            a.washout_weight
        )));
    }
    for f in PKG_FILES {
        if !a.pkg.join(f).is_file() {
            return Err(AvbError::Invalid(format!(
                "{} has no {f}: the site needs the browser runtime. Fix: build it with `bash web/build-pkg.sh` (or pass --pkg DIR)",
                a.pkg.display()
            )));
        }
    }
    let (manifest, av_space, av_name) = bundle_av(&a.bundle)?;
    let inputs = load_inputs(
        &a.features,
        a.ids.as_deref(),
        a.map.as_deref(),
        a.washout.as_deref(),
    )?;
    // Plain direction files name no model: the map's source says where they live.
    let feature_space = inputs
        .feats
        .space
        .clone()
        .or_else(|| inputs.map.as_ref().map(|(_, mm, _)| mm.source.clone()));
    let mut conditions: Vec<&str> = Vec::new();
    match &inputs.map {
        Some((_, mm, _)) => {
            check_map_for_verbalizer(&mm.target, &av_space)?;
            conditions.push("cross");
            if inputs.washout.is_some() {
                conditions.push("cross-washout");
            }
        }
        None => {
            if inputs.washout.is_some() {
                return Err(AvbError::Invalid(
                    "--washout needs --map: washout is mixed into mapped directions (cross-washout)".into(),
                ));
            }
            if inputs.feats.d() != av_space.d
                || feature_space
                    .as_ref()
                    .is_some_and(|s| !Space::same_site(s, &av_space))
            {
                return Err(AvbError::Invalid(format!(
                    "features of {} cannot be read by the bundle's verbalizer ({}). Fix: pass --map (and --washout) from the features' space to the verbalizer's",
                    feature_space.as_ref().map_or(format!("d = {}", inputs.feats.d()), Space::to_string),
                    Space::to_string(&av_space)
                )));
            }
            conditions.push("native");
        }
    }
    let by_range = match a.rows {
        Some(RowsArg::Range) => {
            inputs.feats.row_range(0)?;
            true
        }
        Some(RowsArg::Inline) => false,
        None => matches!(inputs.feats.kind.as_str(), "saelens" | "gemmascope"),
    };
    let bundle_href = match &a.bundle_url {
        Some(url) => format!("{}/", url.trim_end_matches('/')),
        None => "../bundle/".to_string(),
    };
    let where_ = feature_space
        .as_ref()
        .map_or_else(|| format!("d = {}", inputs.feats.d()), Space::to_string);
    let features = &inputs.features;
    let started = std::time::Instant::now();
    let bundle_bytes = build_dir_atomic(&a.output, |dir| {
        let mkdir = |p: PathBuf| std::fs::create_dir_all(&p).map_err(|e| AvbError::io(&p, e));
        for sub in ["assets", "pkg", "features", "artifacts"] {
            mkdir(dir.join(sub))?;
        }
        let bundle_bytes = match &a.bundle_url {
            Some(_) => manifest.files.values().map(|e| e.bytes).sum(),
            None => copy_bundle(&a.bundle, &manifest, &dir.join("bundle"))?,
        };
        for f in PKG_FILES {
            let from = a.pkg.join(f);
            std::fs::copy(&from, dir.join("pkg").join(f)).map_err(|e| AvbError::io(&from, e))?;
        }
        for (name, text) in [
            ("avb.js", AVB_JS),
            ("av-explain.js", WIDGET_JS),
            ("site.css", SITE_CSS),
        ] {
            write_atomic(&dir.join("assets").join(name), &[text.as_bytes()])?;
        }
        let mut artifact_attrs = String::new();
        for (attr, path) in [("map", &a.map), ("washout", &a.washout)] {
            if let Some(p) = path {
                std::fs::copy(p, dir.join("artifacts").join(format!("{attr}.safetensors")))
                    .map_err(|e| AvbError::io(p, e))?;
                artifact_attrs += &format!(" {attr}=\"../artifacts/{attr}.safetensors\"");
            }
        }
        let max_tokens = a
            .max_tokens
            .map_or(String::new(), |n| format!(" max-tokens=\"{n}\""));
        // Range mode: the feature file (and an SAE's cfg.json) next to the pages, read one row at a time.
        let mut source_attrs = String::new();
        if by_range {
            let from = &inputs.feats.file;
            let name = from
                .file_name()
                .map_or("features".into(), |n| n.to_string_lossy().into_owned());
            link_or_copy(from, &dir.join("features").join(&name))?;
            source_attrs = format!(" sae=\"{}\"", escape(&name));
            let cfg = from.with_file_name("cfg.json");
            if inputs.feats.kind == "saelens" && cfg.is_file() {
                link_or_copy(&cfg, &dir.join("features/cfg.json"))?;
                source_attrs += " sae-cfg=\"cfg.json\"";
            }
        }
        let mut rows = String::new();
        for f in features {
            let file = feature_file(f);
            let feature_attr = if by_range {
                let row = inputs.feats.index_of(f.id.parse().unwrap_or(u64::MAX))?;
                format!("{source_attrs} feature-index=\"{row}\"")
            } else {
                let json = serde_json::json!({
                    "id": f.id,
                    "label": f.label,
                    "model": feature_space.as_ref().map(|s| s.model.clone()),
                    "layer": feature_space.as_ref().and_then(|s| s.layer),
                    "direction": f.vector,
                });
                write_atomic(
                    &dir.join("features").join(format!("{file}.json")),
                    &[json.to_string().as_bytes()],
                )?;
                format!(" feature=\"{file}.json\"")
            };
            let widgets: String = conditions
                .iter()
                .map(|c| {
                    let weight = if *c == "cross-washout" {
                        format!(" washout-weight=\"{}\"", a.washout_weight)
                    } else {
                        String::new()
                    };
                    format!(
                        "<h3>{c}</h3>\n<av-explain bundle=\"{}\"{feature_attr}{artifact_attrs} condition=\"{c}\"{weight}{max_tokens}></av-explain>\n",
                        escape(&bundle_href)
                    )
                })
                .collect();
            let title = match &f.label {
                Some(l) => format!("Feature {} — {l}", f.id),
                None => format!("Feature {}", f.id),
            };
            let page = fill(
                FEATURE_PAGE,
                &[
                    ("title", escape(&title)),
                    ("site_title", escape(&a.title)),
                    ("where", escape(&where_)),
                    ("stats", stats_rows(f)),
                    ("verbalizer", escape(&av_name)),
                    (
                        "bundle_size",
                        format!("{:.1} MiB", bundle_bytes as f64 / 1048576.0),
                    ),
                    ("widgets", widgets),
                ],
            );
            write_atomic(
                &dir.join("features").join(format!("{file}.html")),
                &[page.as_bytes()],
            )?;
            rows += &format!(
                "  <tr><td><a href=\"features/{file}.html\">{}</a></td><td>{}</td><td>{:.4}</td></tr>\n",
                escape(&f.id),
                escape(f.label.as_deref().unwrap_or("")),
                norm(&f.vector)
            );
        }
        let summary = format!(
            "{} features of {where_}, explained in the reader's browser by {av_name}; conditions: {}.",
            features.len(),
            conditions.join(", ")
        );
        let index = fill(
            INDEX_PAGE,
            &[
                ("site_title", escape(&a.title)),
                ("summary", escape(&summary)),
                ("rows", rows),
            ],
        );
        write_atomic(&dir.join("index.html"), &[index.as_bytes()])?;
        let site_json = serde_json::json!({
            "tool_version": env!("CARGO_PKG_VERSION"),
            "title": a.title,
            "bundle": bundle_href,
            "bundle_source": manifest.source,
            "verbalizer_site": Space::to_string(&av_space),
            "features": features.iter().map(|f| format!("features/{}.html", feature_file(f))).collect::<Vec<_>>(),
            "conditions": conditions,
            "rows": if by_range { "range" } else { "inline" },
            "washout_weight": inputs.washout.as_ref().map(|_| a.washout_weight),
        });
        write_atomic(
            &dir.join("site.json"),
            &[serde_json::to_string_pretty(&site_json)
                .unwrap_or_default()
                .as_bytes()],
        )?;
        Ok(bundle_bytes)
    })?;
    println!(
        "wrote {}: {} feature pages ({}), verbalizer {av_name} {} ({:.1} MiB), in {:.1} s; preview with `avb site serve {}`",
        a.output.display(),
        features.len(),
        conditions.join(", "),
        if a.bundle_url.is_some() { "linked" } else { "copied" },
        bundle_bytes as f64 / 1048576.0,
        started.elapsed().as_secs_f64(),
        a.output.display()
    );
    Ok(())
}

fn serve(a: SiteServeArgs) -> Result<()> {
    let root = a.dir.canonicalize().map_err(|e| AvbError::io(&a.dir, e))?;
    if !root.join("index.html").is_file() {
        return Err(AvbError::Invalid(format!(
            "{} has no index.html. Fix: build a site there with `avb site build`",
            a.dir.display()
        )));
    }
    let listener = TcpListener::bind(("127.0.0.1", a.port)).map_err(|e| {
        AvbError::Invalid(format!(
            "cannot listen on 127.0.0.1:{}: {e}. Fix: choose another --port (0 picks a free one)",
            a.port
        ))
    })?;
    let port = listener
        .local_addr()
        .map_err(|e| AvbError::Invalid(e.to_string()))?
        .port();
    println!(
        "serving {} at http://127.0.0.1:{port}/ (Ctrl-C stops)",
        a.dir.display()
    );
    std::io::stdout().flush().ok();
    for stream in listener.incoming().flatten() {
        let root = root.clone();
        std::thread::spawn(move || {
            // A broken connection concerns that client only.
            let _ = respond(stream, &root);
        });
    }
    Ok(())
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") | Some("mjs") => "text/javascript",
        Some("css") => "text/css",
        Some("wasm") => "application/wasm",
        Some("json") => "application/json",
        Some("yaml") => "text/yaml",
        Some("jinja") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// `bytes=A-B`, `bytes=A-` or `bytes=-N` of a file of `len` bytes, as a half-open range; None if unsatisfiable.
fn parse_range(spec: &str, len: u64) -> Option<(u64, u64)> {
    let (a, b) = spec.strip_prefix("bytes=")?.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => (len.saturating_sub(n.parse().ok()?), len),
        (a, "") => (a.parse().ok()?, len),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.saturating_add(1).min(len),
        ),
    };
    (start < end && start < len).then_some((start, end))
}

fn respond(stream: TcpStream, root: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request)? == 0 {
            return Ok(());
        }
        let mut range = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                if k.trim().eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
            }
        }
        let mut parts = request.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        if method != "GET" && method != "HEAD" {
            write!(
                out,
                "HTTP/1.1 405 Method Not Allowed\r\nallow: GET, HEAD\r\ncontent-length: 0\r\n\r\n"
            )?;
            continue;
        }
        let path = target.split(['?', '#']).next().unwrap_or("/");
        let mut file = root.to_path_buf();
        let mut bad = false;
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            let seg = percent_decode(seg);
            if seg == ".." || seg.contains(['/', '\\']) {
                bad = true;
            }
            file.push(seg);
        }
        if file.is_dir() {
            file.push("index.html");
        }
        let opened = if bad {
            None
        } else {
            std::fs::File::open(&file).ok()
        };
        let Some(mut f) = opened else {
            write!(out, "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")?;
            continue;
        };
        let len = f.metadata()?.len();
        let (status, start, end) = match range.as_deref().map(|r| parse_range(r, len)) {
            None => ("200 OK", 0, len),
            Some(Some((s, e))) => ("206 Partial Content", s, e),
            Some(None) => {
                write!(out, "HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */{len}\r\ncontent-length: 0\r\n\r\n")?;
                continue;
            }
        };
        write!(
            out,
            "HTTP/1.1 {status}\r\ncontent-type: {}\r\ncontent-length: {}\r\naccept-ranges: bytes\r\ncache-control: no-cache\r\n",
            content_type(&file),
            end - start
        )?;
        if status.starts_with("206") {
            write!(out, "content-range: bytes {start}-{}/{len}\r\n", end - 1)?;
        }
        write!(out, "\r\n")?;
        if method == "GET" {
            f.seek(SeekFrom::Start(start))?;
            std::io::copy(&mut (&mut f).take(end - start), &mut out)?;
        }
        out.flush()?;
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|&b| hex(b)),
            bytes.get(i + 2).and_then(|&b| hex(b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges_follow_rfc_9110() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 10)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 100)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 100)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 100)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-2", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }

    #[test]
    fn page_text_is_escaped_and_slots_filled() {
        assert_eq!(escape("<b a=\"1\">&"), "&lt;b a=&quot;1&quot;&gt;&amp;");
        assert_eq!(
            fill(
                "<h1>{{title}}</h1>{{x}}",
                &[("title", "T".into()), ("x", "y".into())]
            ),
            "<h1>T</h1>y"
        );
        assert_eq!(percent_decode("a%20b%2e%zz"), "a b.%zz");
    }
}
