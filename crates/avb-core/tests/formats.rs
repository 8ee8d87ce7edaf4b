//! Artifact, safetensors, npy and feature-input round trips, lazy row reads, and every bad-input case with its
//! message checked.

mod common;
use avb_core::artifact::{
    self, ActivationSetMeta, Artifact, Body, CorpusRef, InputRef, NamedTensor, Space, WashoutMeta,
};
use avb_core::features::FeatureSource;
use avb_core::io::{BytesSource, FileSource};
use avb_core::ridge::{self, Form};
use avb_core::safetensors::{self, Dtype, Header, TensorOut};
use avb_core::{npy, washout, Matrix};
use std::collections::BTreeMap;
use std::path::Path;

fn activation_body(n: usize, d: usize) -> Body {
    Body::ActivationSet(ActivationSetMeta {
        space: Space {
            model: "test/model".into(),
            layer: Some(3),
            d,
        },
        pooling: "mean".into(),
        corpus: CorpusRef {
            id: "corpus".into(),
            sha256: "00".repeat(32),
        },
        row_ids: (0..n).map(|i| format!("r{i}")).collect(),
    })
}

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
        .collect()
}

fn write_activations(path: &Path, n: usize, d: usize, dtype: Dtype) -> Vec<f32> {
    let v = values(n * d);
    artifact::write(
        path,
        activation_body(n, d),
        "test",
        dtype,
        &[NamedTensor {
            name: "activations",
            shape: vec![n, d],
            values: &v,
        }],
    )
    .unwrap();
    v
}

fn err_text<T>(r: avb_core::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn artifact_round_trip_f32_and_f16_with_row_reads() {
    let dir = tempfile::tempdir().unwrap();
    // 600 x 1000 f32 = 2.4 MB: three hash chunks, so a row read touches one or two of them.
    let p = dir.path().join("a.safetensors");
    let v = write_activations(&p, 600, 1000, Dtype::F32);
    let art = Artifact::open(&p).unwrap();
    art.verify().unwrap();
    assert_eq!(art.meta.payload.chunk_sha256.len(), 3);
    assert_eq!(art.meta.schema_version, artifact::SCHEMA_VERSION);
    let m = art.read_matrix("activations").unwrap();
    assert_eq!((m.rows, m.cols), (600, 1000));
    assert_eq!(m.data, v);
    assert_eq!(
        art.read_rows("activations", 262, 2).unwrap(),
        v[262_000..264_000].to_vec()
    );

    let p16 = dir.path().join("h.safetensors");
    write_activations(&p16, 10, 64, Dtype::F16);
    let a16 = Artifact::open(&p16).unwrap();
    assert_eq!(a16.tensor_info("activations").unwrap().dtype, Dtype::F16);
    let got = a16.read_rows("activations", 4, 1).unwrap();
    for (g, w) in got.iter().zip(&values(640)[256..320]) {
        assert!(
            (g - w).abs() <= w.abs() * 1e-3 + 1e-3,
            "f16 round trip {g} vs {w}"
        );
    }
}

#[test]
fn a_row_read_verifies_only_its_chunks_and_catches_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.safetensors");
    write_activations(&p, 600, 1000, Dtype::F32);
    let data_start = Header::read(&FileSource::open(&p).unwrap())
        .unwrap()
        .data_start as usize;
    let mut bytes = std::fs::read(&p).unwrap();
    // Flip one byte inside the third chunk.
    bytes[data_start + 2 * (1 << 20) + 10] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    let art = Artifact::open(&p).unwrap();
    // Rows in the first chunk still read fine ...
    art.read_rows("activations", 0, 1).unwrap();
    // ... the damaged chunk is refused with a message naming the problem and the fix.
    let e = err_text(art.read_rows("activations", 560, 1));
    assert!(
        e.contains("sha256 mismatch in payload chunk 2") && e.contains("re-download or re-create"),
        "{e}"
    );
    let e = err_text(art.verify());
    assert!(e.contains("sha256 mismatch"), "{e}");
}

#[test]
fn truncated_and_corrupt_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.safetensors");
    write_activations(&p, 20, 16, Dtype::F32);
    let bytes = std::fs::read(&p).unwrap();

    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = err_text(Artifact::open(&cut));
    assert!(
        e.contains("cut.safetensors") && e.contains("truncated") && e.contains("ends at data byte"),
        "{e}"
    );

    std::fs::write(&cut, &bytes[..5]).unwrap();
    assert!(err_text(Artifact::open(&cut)).contains("shorter than the 8-byte"));

    std::fs::write(&cut, &bytes[..40]).unwrap();
    assert!(err_text(Artifact::open(&cut)).contains("header claims"));

    let mut garbage = bytes.clone();
    garbage[8] = b'#';
    std::fs::write(&cut, &garbage).unwrap();
    let e = err_text(Artifact::open(&cut));
    assert!(e.contains("corrupt") && e.contains("not valid JSON"), "{e}");

    let mut trailing = bytes.clone();
    trailing.extend_from_slice(&[0u8; 12]);
    std::fs::write(&cut, &trailing).unwrap();
    assert!(err_text(Artifact::open(&cut)).contains("12 trailing bytes"));

    let missing = dir.path().join("missing.safetensors");
    let e = err_text(Artifact::open(&missing));
    assert!(
        e.contains("missing.safetensors") && e.contains("cannot read"),
        "{e}"
    );
}

/// Rewrite the avbridge metadata JSON of an artifact (keeping the payload).
fn rewrite_metadata(path: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let src = FileSource::open(path).unwrap();
    let h = Header::read(&src).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_str(&h.metadata[artifact::METADATA_KEY]).unwrap();
    edit(&mut meta);
    let (_, info) = h.tensors.iter().next().unwrap();
    let v = safetensors::read_rows(&src, info, 0, info.shape[0]).unwrap();
    let mut md = BTreeMap::new();
    md.insert(artifact::METADATA_KEY.to_string(), meta.to_string());
    let (name, _) = h.tensors.iter().next().unwrap();
    let (head, data) = safetensors::serialize(
        &[TensorOut {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            values: &v,
        }],
        &md,
    );
    std::fs::write(path, [head, data].concat()).unwrap();
}

#[test]
fn unknown_schema_version_and_schema_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.safetensors");
    write_activations(&p, 4, 8, Dtype::F32);
    rewrite_metadata(&p, |m| m["schema_version"] = 99.into());
    let e = err_text(Artifact::open(&p));
    assert!(
        e.contains("schema version 99") && e.contains("upgrade avb"),
        "{e}"
    );

    write_activations(&p, 4, 8, Dtype::F32);
    rewrite_metadata(&p, |m| m["row_ids"] = serde_json::json!(["only-one"]));
    let e = err_text(Artifact::open(&p));
    assert!(
        e.contains("has shape [4, 8] but the metadata implies"),
        "{e}"
    );

    write_activations(&p, 4, 8, Dtype::F32);
    rewrite_metadata(&p, |m| m["payload"]["chunk_sha256"] = serde_json::json!([]));
    assert!(err_text(Artifact::open(&p)).contains("chunk hashes"));

    // A plain safetensors file is not an artifact.
    let v = values(8);
    let (head, data) = safetensors::serialize(
        &[TensorOut {
            name: "x",
            dtype: Dtype::F32,
            shape: vec![2, 4],
            values: &v,
        }],
        &BTreeMap::new(),
    );
    std::fs::write(&p, [head, data].concat()).unwrap();
    assert!(err_text(Artifact::open(&p)).contains("without avbridge metadata"));
}

#[test]
fn failed_writes_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.safetensors");
    let mut v = values(32);
    v[9] = f32::NAN;
    let e = err_text(artifact::write(
        &p,
        activation_body(4, 8),
        "t",
        Dtype::F32,
        &[NamedTensor {
            name: "activations",
            shape: vec![4, 8],
            values: &v,
        }],
    ));
    assert!(
        e.contains("non-finite value") && e.contains("row 1, column 1"),
        "{e}"
    );
    let e = err_text(artifact::write(
        &dir.path().join("no/such/dir/x.safetensors"),
        activation_body(4, 8),
        "t",
        Dtype::F32,
        &[NamedTensor {
            name: "activations",
            shape: vec![4, 8],
            values: &values(32),
        }],
    ));
    assert!(e.contains("does not exist"), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[test]
fn ridge_bad_inputs() {
    let x = Matrix::new(10, 3, values(30));
    let y9 = Matrix::new(9, 2, values(18));
    let e = err_text(ridge::fit_ridge(&x, &y9, 1.0, Form::Auto, true));
    assert!(
        e.contains("source has 10 rows but target has 9") && e.contains("Fix"),
        "{e}"
    );

    let mut yn = Matrix::new(10, 2, values(20));
    yn.data[7] = f32::INFINITY;
    let e = err_text(ridge::fit_ridge(&x, &yn, 1.0, Form::Auto, true));
    assert!(
        e.contains("target activations") && e.contains("row 3, column 1"),
        "{e}"
    );

    let e = err_text(ridge::fit_ridge(
        &Matrix::new(0, 3, vec![]),
        &Matrix::new(0, 2, vec![]),
        1.0,
        Form::Auto,
        true,
    ));
    assert!(e.contains("empty input"), "{e}");

    // Duplicate columns with lambda = 0: singular normal equations.
    let dup = Matrix::new(6, 2, vec![1., 1., 2., 2., 3., 3., 4., 4., 5., 5., 7., 7.]);
    let y = Matrix::new(6, 1, vec![1., 2., 3., 4., 5., 6.]);
    let e = err_text(ridge::fit_ridge(&dup, &y, 0.0, Form::Primal, true));
    assert!(
        e.contains("singular") && e.contains("larger --lambda"),
        "{e}"
    );
    assert!(
        err_text(ridge::fit_ridge(&dup, &y, -1.0, Form::Primal, true)).contains("lambda must be")
    );

    let map = ridge::fit_ridge(&x, &Matrix::new(10, 2, values(20)), 1.0, Form::Auto, true)
        .unwrap()
        .map;
    let e = err_text(map.apply(&Matrix::new(1, 5, values(5)), false));
    assert!(
        e.contains("inputs have d = 5 but the map expects d_src = 3"),
        "{e}"
    );
}

#[test]
fn washout_vector_and_mix() {
    let rows = Matrix::new(2, 2, vec![3.0, 4.0, 0.0, 2.0]);
    let (b, norm) = washout::washout_vector(&rows, "t").unwrap();
    assert!((b[0] - 0.3).abs() < 1e-7 && (b[1] - 0.9).abs() < 1e-7);
    assert!((norm - (0.09f64 + 0.81).sqrt()).abs() < 1e-7);
    let m = washout::mix(&[2.0, 0.0], &b, 1.0).unwrap();
    let expect = [1.3f64, 0.9];
    let en = (expect[0] * expect[0] + expect[1] * expect[1]).sqrt();
    assert!(
        (m[0] as f64 - expect[0] / en).abs() < 1e-7 && (m[1] as f64 - expect[1] / en).abs() < 1e-7
    );
    let e = err_text(washout::washout_vector(
        &Matrix::new(2, 2, vec![1.0, 0.0, 0.0, 0.0]),
        "acts",
    ));
    assert!(e.contains("row 1 is all zeros"), "{e}");
    assert!(err_text(washout::mix(&[1.0, 0.0], &[1.0, 0.0, 0.0], 1.0))
        .contains("d = 2 but the washout vector has d = 3"));
    assert!(err_text(washout::mix(&[1.0, 0.0], &[1.0, 0.0], -1.0)).contains("cancels to zero"));
}

#[test]
fn npy_reader_cases() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.npy");
    std::fs::write(&p, npy::to_bytes(3, 4, &values(12))).unwrap();
    let (r, c, v) = npy::read_all(&FileSource::open(&p).unwrap()).unwrap();
    assert_eq!((r, c, v), (3, 4, values(12)));
    let bytes = std::fs::read(&p).unwrap();
    let e = err_text(npy::read_header(&BytesSource::new(
        "d.npy",
        bytes[..bytes.len() - 4].to_vec(),
    )));
    assert!(e.contains("truncated"), "{e}");
    let replace = |from: &str, to: &str| {
        let pos = bytes
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .unwrap();
        [&bytes[..pos], to.as_bytes(), &bytes[pos + from.len()..]].concat()
    };
    let fortran = replace("'fortran_order': False", "'fortran_order': True ");
    let e = err_text(npy::read_header(&BytesSource::new("f.npy", fortran)));
    assert!(
        e.contains("Fortran-ordered") && e.contains("ascontiguousarray"),
        "{e}"
    );
    let int = replace("'<f4'", "'<i4'");
    assert!(err_text(npy::read_header(&BytesSource::new("i.npy", int))).contains("dtype `<i4`"));
    assert!(err_text(npy::read_header(&BytesSource::new(
        "x.npy",
        b"PK\x03\x04not-npy".to_vec()
    )))
    .contains("magic"));
}

fn write_plain(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) {
    let outs: Vec<TensorOut> = tensors
        .iter()
        .map(|(n, d, s, v)| TensorOut {
            name: n,
            dtype: *d,
            shape: s.clone(),
            values: v,
        })
        .collect();
    let (head, data) = safetensors::serialize(&outs, &BTreeMap::new());
    std::fs::write(path, [head, data].concat()).unwrap();
}

#[test]
fn saelens_v6_v5_gemmascope_and_direction_files() {
    let dir = tempfile::tempdir().unwrap();
    let (d_sae, d_in) = (12, 8);
    let w = values(d_sae * d_in);
    for (version, cfg) in [
        (
            "v6",
            serde_json::json!({"d_in": d_in, "d_sae": d_sae, "dtype": "bfloat16", "architecture": "jumprelu",
                                 "metadata": {"model_name": "qwen2.5-7b-instruct", "hook_name": "blocks.20.hook_resid_post"}}),
        ),
        (
            "v5",
            serde_json::json!({"d_in": d_in, "d_sae": d_sae, "dtype": "float16", "architecture": "standard",
                                 "model_name": "gemma-2-2b", "hook_name": "blocks.12.hook_resid_post", "hook_layer": 12}),
        ),
    ] {
        let sae = dir.path().join(version);
        std::fs::create_dir(&sae).unwrap();
        std::fs::write(sae.join("cfg.json"), cfg.to_string()).unwrap();
        let dtype = if version == "v6" {
            Dtype::BF16
        } else {
            Dtype::F16
        };
        write_plain(
            &sae.join("sae_weights.safetensors"),
            &[
                ("W_enc", dtype, vec![d_in, d_sae], values(d_sae * d_in)),
                ("W_dec", dtype, vec![d_sae, d_in], w.clone()),
                ("b_dec", Dtype::F32, vec![d_in], values(d_in)),
            ],
        );
        let f = FeatureSource::open(&sae, None).unwrap();
        assert_eq!((f.kind.as_str(), f.len(), f.d()), ("saelens", d_sae, d_in));
        let space = f.space.clone().unwrap();
        assert_eq!(space.layer, Some(if version == "v6" { 20 } else { 12 }));
        let row = f.row(5).unwrap();
        for (g, e) in row.iter().zip(&w[5 * d_in..6 * d_in]) {
            assert!(
                (g - e).abs() <= e.abs() * 8e-3 + 1e-3,
                "{version} row 5: {g} vs {e}"
            );
        }
        // cfg.json that disagrees with the weights
        std::fs::write(
            sae.join("cfg.json"),
            serde_json::json!({"d_in": 9, "d_sae": d_sae, "hook_name": "blocks.1.hook_resid_post"})
                .to_string(),
        )
        .unwrap();
        let e = err_text(FeatureSource::open(&sae, None));
        assert!(
            e.contains("W_dec has shape [12, 8] but cfg.json says"),
            "{e}"
        );
    }
    let gs = dir.path().join("params.safetensors");
    write_plain(
        &gs,
        &[
            ("w_enc", Dtype::F32, vec![d_in, d_sae], values(96)),
            ("w_dec", Dtype::F32, vec![d_sae, d_in], w.clone()),
            ("threshold", Dtype::F32, vec![d_sae], values(12)),
        ],
    );
    let f = FeatureSource::open(&gs, None).unwrap();
    assert_eq!(f.kind, "gemmascope");
    assert_eq!(f.row(11).unwrap(), w[88..96].to_vec());

    let npy_path = dir.path().join("dirs.npy");
    std::fs::write(&npy_path, npy::to_bytes(3, 4, &values(12))).unwrap();
    std::fs::write(
        dir.path().join("dirs.labels.json"),
        r#"["war", null, "music"]"#,
    )
    .unwrap();
    let f = FeatureSource::open(&npy_path, None).unwrap();
    assert_eq!(
        (f.kind.as_str(), f.label(0), f.label(1), f.label(2)),
        ("directions", Some("war"), None, Some("music"))
    );
    assert_eq!(f.row(2).unwrap(), values(12)[8..].to_vec());
    assert!(err_text(f.index_of(3)).contains("feature 3 does not exist"));
    std::fs::write(dir.path().join("dirs.labels.json"), r#"["war"]"#).unwrap();
    assert!(err_text(FeatureSource::open(&npy_path, None)).contains("1 labels for 3 directions"));

    let st = dir.path().join("two.safetensors");
    write_plain(
        &st,
        &[
            ("a", Dtype::F32, vec![2, 4], values(8)),
            ("b", Dtype::F32, vec![2, 4], values(8)),
        ],
    );
    assert!(err_text(FeatureSource::open(&st, None)).contains("cannot tell which tensor"));
    let mut nan = values(12);
    nan[5] = f32::NAN;
    write_plain(&st, &[("directions", Dtype::F32, vec![3, 4], nan)]);
    assert!(err_text(FeatureSource::open(&st, None).unwrap().row(1)).contains("row 1, column 1"));
}

/// The browser's path to a feature row: the file's header from its first bytes (`header_extent` of them), then
/// one row's byte range, decoded, for SAELens (bf16, with cfg.json), GemmaScope and .npy / .safetensors direction
/// files. Rows equal the ones read from the file itself; missing header bytes and short rows are named.
#[test]
fn feature_rows_by_byte_range_from_a_header_prefix() {
    use avb_core::features::header_extent;
    let dir = tempfile::tempdir().unwrap();
    let (d_sae, d_in) = (12, 8);
    let sae = dir.path().join("sae");
    std::fs::create_dir(&sae).unwrap();
    let cfg = serde_json::json!({"d_in": d_in, "d_sae": d_sae,
        "metadata": {"model_name": "qwen2.5-7b-instruct", "hook_name": "blocks.20.hook_resid_post"}})
    .to_string();
    std::fs::write(sae.join("cfg.json"), &cfg).unwrap();
    write_plain(
        &sae.join("sae_weights.safetensors"),
        &[
            ("W_enc", Dtype::BF16, vec![d_in, d_sae], values(96)),
            ("W_dec", Dtype::BF16, vec![d_sae, d_in], values(96)),
        ],
    );
    let gs = dir.path().join("params.safetensors");
    write_plain(&gs, &[("w_dec", Dtype::F16, vec![d_sae, d_in], values(96))]);
    let npy_path = dir.path().join("dirs.npy");
    std::fs::write(&npy_path, npy::to_bytes(3, 4, &values(12))).unwrap();
    for (file, local, cfg) in [
        (
            sae.join("sae_weights.safetensors"),
            sae.clone(),
            Some(cfg.as_str()),
        ),
        (gs.clone(), gs.clone(), None),
        (npy_path.clone(), npy_path.clone(), None),
    ] {
        let bytes = std::fs::read(&file).unwrap();
        let extent = header_extent(&bytes[..12]).unwrap() as usize;
        assert!(extent < bytes.len(), "{}", file.display());
        let name = file.file_name().unwrap().to_str().unwrap();
        let remote =
            FeatureSource::from_prefix(name, bytes.len() as u64, bytes[..extent].to_vec(), cfg)
                .unwrap();
        let native = FeatureSource::open(&local, None).unwrap();
        assert_eq!(
            (remote.kind.as_str(), remote.len(), remote.d()),
            (native.kind.as_str(), native.len(), native.d())
        );
        assert_eq!(remote.space, native.space);
        for i in 0..remote.len() {
            let (start, end) = remote.row_range(i).unwrap();
            let row = remote
                .decode_row(i, &bytes[start as usize..end as usize])
                .unwrap();
            assert_eq!(row, native.row(i).unwrap(), "{name} row {i}");
        }
        let (start, end) = remote.row_range(1).unwrap();
        assert!(
            err_text(remote.decode_row(1, &bytes[start as usize..end as usize - 1]))
                .contains(&format!("feature row 1 is bytes {start}..{end}"))
        );
        assert!(err_text(remote.row_range(remote.len())).contains("does not exist"));
        // A prefix that stops inside the header names the bytes still to fetch.
        let short =
            FeatureSource::from_prefix(name, bytes.len() as u64, bytes[..extent - 1].to_vec(), cfg);
        assert!(err_text(short).contains(&format!(
            "only the first {} of {} were fetched",
            extent - 1,
            bytes.len()
        )));
    }
    // A cfg.json of another SAE, and NaN rows, are refused as they are for local files.
    let bytes = std::fs::read(sae.join("sae_weights.safetensors")).unwrap();
    let wrong = serde_json::json!({"d_in": 9, "d_sae": d_sae}).to_string();
    let e = err_text(FeatureSource::from_prefix(
        "sae_weights.safetensors",
        bytes.len() as u64,
        bytes.clone(),
        Some(&wrong),
    ));
    assert!(
        e.contains("W_dec has shape [12, 8] but cfg.json says"),
        "{e}"
    );
    let remote =
        FeatureSource::from_prefix("dirs.npy", 100, std::fs::read(&npy_path).unwrap(), None)
            .unwrap();
    let nan = [
        f32::NAN.to_le_bytes(),
        0f32.to_le_bytes(),
        0f32.to_le_bytes(),
        0f32.to_le_bytes(),
    ]
    .concat();
    assert!(err_text(remote.decode_row(0, &nan)).contains("feature row"));
    assert_eq!(header_extent(b"\x93NUMPY"), None, "too short to tell");
}

#[test]
fn other_artifact_kinds_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.safetensors");
    let b = values(16);
    let body = Body::Washout(WashoutMeta {
        space: Space {
            model: "m".into(),
            layer: Some(1),
            d: 16,
        },
        pooling: "last".into(),
        n_rows: 100,
        input: InputRef {
            file: "acts.safetensors".into(),
            sha256: "ab".repeat(32),
        },
        norm: 0.5,
    });
    artifact::write(
        &p,
        body.clone(),
        "avb washout",
        Dtype::F32,
        &[NamedTensor {
            name: "washout",
            shape: vec![16],
            values: &b,
        }],
    )
    .unwrap();
    let art = Artifact::open(&p).unwrap();
    assert_eq!(art.meta.body, body);
    assert_eq!(art.read_tensor("washout").unwrap().1, b);
    let e = err_text(art.read_tensor("missing"));
    assert!(e.contains("tensor `missing` is missing"), "{e}");
    assert!(matches!(Artifact::open(&p).map(|a| a.verify()), Ok(Ok(()))));
}
