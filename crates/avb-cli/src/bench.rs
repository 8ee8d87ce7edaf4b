//! `avb bench ridge`: ridge fits at the seed experiment's shapes against scikit-learn on the same data, in the
//! same run, with the fraction of the machine's measured f32 GEMM rate. Prints a Markdown table.

use avb_core::ridge::{self, Form};
use avb_core::rng::SplitMix64;
use avb_core::{npy, AvbError, Matrix, Result};
use faer::Mat;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Ridge fit (d_src 3584 -> d_tgt 5376 by default) against scikit-learn `Ridge`.
    Ridge(RidgeBenchArgs),
    /// Greedy decoding with random weights of a real shape against transformers (batch 1 / 16 / 64).
    Decode(crate::bench_decode::DecodeBenchArgs),
}

#[derive(clap::Args)]
pub struct RidgeBenchArgs {
    /// Row counts to benchmark.
    #[arg(long, value_delimiter = ',', default_value = "1000,20000")]
    pub sizes: Vec<usize>,
    #[arg(long, default_value_t = 3584)]
    pub d_src: usize,
    #[arg(long, default_value_t = 5376)]
    pub d_tgt: usize,
    #[arg(long, default_value_t = 100.0)]
    pub lambda: f64,
    /// Rounds per size, each a warm-up and a timed fit of both sides (medians reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Reference script (scikit-learn) run on the same matrices.
    #[arg(long, default_value = "tests/scripts/bench_ridge_reference.py")]
    pub reference: PathBuf,
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Also write the table, with the command and machine, to this Markdown file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Ridge(a) => ridge_bench(a),
        BenchCommand::Decode(a) => crate::bench_decode::decode_bench(a),
    }
}

/// Activation-like pairs: a shared 256-dim latent, large per-dimension offsets, isotropic noise.
fn synthetic(n: usize, d_src: usize, d_tgt: usize, seed: u64) -> (Matrix, Matrix) {
    let mut rng = SplitMix64::new(seed);
    let mut normal =
        |r: usize, c: usize, s: f64| Mat::<f32>::from_fn(r, c, |_, _| (rng.normal() * s) as f32);
    let rank = 256;
    let z = normal(n, rank, 1.0);
    let (a, b) = (normal(rank, d_src, 0.5), normal(rank, d_tgt, 0.5));
    let (xs, ys) = (&z * &a, &z * &b);
    let (ox, oy) = (normal(1, d_src, 3.0), normal(1, d_tgt, 3.0));
    let (nx, ny) = (normal(n, d_src, 1.0), normal(n, d_tgt, 1.0));
    let x = Matrix::new(
        n,
        d_src,
        (0..n * d_src)
            .map(|k| xs[(k / d_src, k % d_src)] + nx[(k / d_src, k % d_src)] + ox[(0, k % d_src)])
            .collect(),
    );
    let y = Matrix::new(
        n,
        d_tgt,
        (0..n * d_tgt)
            .map(|k| ys[(k / d_tgt, k % d_tgt)] + ny[(k / d_tgt, k % d_tgt)] + oy[(0, k % d_tgt)])
            .collect(),
    );
    (x, y)
}

/// Run a reference script and parse the JSON it prints; `install` says what to install when it cannot start.
pub(crate) fn run_reference(cmd: &mut Command, install: &str) -> Result<serde_json::Value> {
    let out = cmd.output().map_err(|e| {
        AvbError::Invalid(format!(
            "could not run {:?}: {e}. Fix: {install}.",
            cmd.get_program()
        ))
    })?;
    if !out.status.success() {
        return Err(AvbError::Invalid(format!(
            "reference script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| AvbError::Invalid(format!("reference output is not JSON ({e})")))
}

/// The scikit-learn side as a long-lived process (tests/scripts/bench_ridge_reference.py): it loads the
/// matrices once and fits on request, so its fits can alternate with ours.
struct Reference {
    child: std::process::Child,
    answers: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Reference {
    fn start(cmd: &mut Command) -> Result<Self> {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| {
                AvbError::Invalid(format!(
                    "could not run {:?}: {e}. Fix: install python3 with numpy and scikit-learn.",
                    cmd.get_program()
                ))
            })?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut reference = Reference {
            child,
            answers: std::io::BufReader::new(stdout).lines(),
        };
        reference.ask(None)?;
        Ok(reference)
    }

    /// Send `cmd` (None: just read the next answer) and parse the JSON line that answers it.
    fn ask(&mut self, cmd: Option<&str>) -> Result<serde_json::Value> {
        use std::io::Write;
        let failed = |why: String| {
            AvbError::Invalid(format!(
                "the scikit-learn reference failed ({why}); its error output is above. Fix: install python3 with \
                 numpy and scikit-learn (pip install scikit-learn)."
            ))
        };
        if let Some(cmd) = cmd {
            let stdin = self.child.stdin.as_mut().expect("piped stdin");
            writeln!(stdin, "{cmd}")
                .and_then(|_| stdin.flush())
                .map_err(|e| failed(format!("sending {cmd:?}: {e}")))?;
        }
        let line = match self.answers.next() {
            Some(Ok(line)) => line,
            Some(Err(e)) => return Err(failed(e.to_string())),
            None => return Err(failed("it exited".into())),
        };
        serde_json::from_str(&line).map_err(|e| failed(format!("answer {line:?} is not JSON: {e}")))
    }

    /// One timed fit; its seconds.
    fn fit(&mut self) -> Result<f64> {
        let answer = self.ask(Some("fit"))?;
        answer["s"]
            .as_f64()
            .ok_or_else(|| AvbError::Invalid(format!("reference answered {answer} to a fit")))
    }

    /// Save the last fit's weights; library versions and numpy's sgemm rate.
    fn finish(mut self) -> Result<serde_json::Value> {
        let answer = self.ask(Some("finish"))?;
        let _ = self.child.wait();
        Ok(answer)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measured f32 GEMM rates of this machine (4096^3, GFLOP/s): faer's, and avbridge's kernel where this CPU has
/// it (None elsewhere).
fn gemm_rates() -> (f64, Option<f64>) {
    let n = 4096;
    let a = Mat::<f32>::from_fn(n, n, |i, j| ((i * 7 + j * 13) % 17) as f32 * 0.1);
    let rate = |f: &dyn Fn() -> Mat<f32>| {
        std::hint::black_box(f());
        let t = Instant::now();
        std::hint::black_box(f());
        2.0 * (n as f64).powi(3) / t.elapsed().as_secs_f64() / 1e9
    };
    let faer_rate = rate(&|| &a * &a);
    let avb_rate = avb_core::gemm::kernel_available()
        .then(|| rate(&|| avb_core::gemm::product(a.as_ref(), a.as_ref())));
    (faer_rate, avb_rate)
}

/// Flops performed: the symmetric product's lower triangle, the cross product, the Cholesky factorisation and
/// the two triangular solves (and, in the dual form, X^T A).
fn flops(n: usize, d: usize, t: usize, form: Form) -> f64 {
    let (n, d, t) = (n as f64, d as f64, t as f64);
    match form {
        Form::Dual => n * n * d + n.powi(3) / 3.0 + 2.0 * n * n * t + 2.0 * n * d * t,
        _ => n * d * d + 2.0 * n * d * t + d.powi(3) / 3.0 + 2.0 * d * d * t,
    }
}

fn ridge_bench(a: RidgeBenchArgs) -> Result<()> {
    if a.reps == 0 {
        return Err(AvbError::Invalid(
            "--reps 0 times nothing. Fix: pass --reps 1 or more.".into(),
        ));
    }
    if !a.reference.exists() {
        return Err(AvbError::Invalid(format!(
            "reference script {} not found. Fix: run from the repository root or pass --reference.",
            a.reference.display()
        )));
    }
    let dir = std::env::temp_dir().join(format!("avb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| AvbError::io(&dir, e))?;
    let (faer_rate, avb_rate) = gemm_rates();
    let rate = faer_rate.max(avb_rate.unwrap_or(0.0));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    for &n in &a.sizes {
        eprintln!("n = {n}: generating data");
        let (x, y) = synthetic(n, a.d_src, a.d_tgt, n as u64);
        let (xp, yp, wp) = (dir.join("x.npy"), dir.join("y.npy"), dir.join("w_ref.npy"));
        std::fs::write(&xp, npy::to_bytes(x.rows, x.cols, &x.data))
            .map_err(|e| AvbError::io(&xp, e))?;
        std::fs::write(&yp, npy::to_bytes(y.rows, y.cols, &y.data))
            .map_err(|e| AvbError::io(&yp, e))?;
        let mut sklearn = Reference::start(
            Command::new(&a.python)
                .arg(&a.reference)
                .args([xp.as_os_str(), yp.as_os_str(), wp.as_os_str()])
                .args(["--lambda", &a.lambda.to_string()]),
        )?;
        eprintln!(
            "n = {n}: {} rounds, each a warm-up and a timed fit of avb and of scikit-learn, in alternating order",
            a.reps
        );
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let mut fitted = None;
        for round in 0..a.reps {
            for side in [round % 2, 1 - round % 2] {
                if side == 0 {
                    let mut fit_once = || -> Result<f64> {
                        let t = Instant::now();
                        fitted = Some(ridge::fit_ridge(&x, &y, a.lambda, Form::Auto, true)?);
                        Ok(t.elapsed().as_secs_f64())
                    };
                    fit_once()?;
                    ours.push(fit_once()?);
                } else {
                    sklearn.fit()?;
                    theirs.push(sklearn.fit()?);
                }
            }
            eprintln!(
                "n = {n}: round {}: avb {:.2} s, scikit-learn {:.2} s",
                round + 1,
                ours[round],
                theirs[round]
            );
        }
        let r = sklearn.finish()?;
        let fit = fitted.expect("at least one round");
        let (map, form) = (fit.map, fit.form);
        let solve = if fit.f32_solve.is_some() {
            "f32"
        } else {
            "f64"
        };
        let ratios: Vec<f64> = theirs.iter().zip(&ours).map(|(t, o)| t / o).collect();
        let (ratio_lo, ratio_hi) = ratios.iter().fold((f64::INFINITY, 0f64), |(lo, hi), r| {
            (lo.min(*r), hi.max(*r))
        });
        let ratio_median = median(ratios);
        let (ours, theirs) = (median(ours), median(theirs));
        let (_, _, w_ref) = npy::read_all(&avb_core::io::FileSource::open(&wp)?)?;
        let num: f64 = map
            .weight
            .data
            .iter()
            .zip(&w_ref)
            .map(|(p, q)| (*p as f64 - *q as f64).powi(2))
            .sum();
        let den: f64 = w_ref.iter().map(|q| (*q as f64).powi(2)).sum();
        let gf = flops(n, a.d_src, a.d_tgt, form) / ours / 1e9;
        let ceiling = rate.max(r["numpy_sgemm_gflops"].as_f64().unwrap_or(0.0));
        rows.push(format!(
            "| {n} | {} -> {} | {} ({solve} solve) | {ours:.2} | {theirs:.2} | {:.2}x | {ratio_median:.2}x ({ratio_lo:.2}x-{ratio_hi:.2}x) | {gf:.0} | {:.0}% | {:.1e} |",
            a.d_src,
            a.d_tgt,
            form.name(),
            theirs / ours,
            100.0 * gf / ceiling,
            (num / den).sqrt()
        ));
        eprintln!(
            "n = {n}: avb {ours:.2} s, sklearn {theirs:.2} s ({})",
            r["versions"]
        );
        if n == *a.sizes.last().unwrap() {
            rows.push(format!(
                "\nReference: scikit-learn {} (numpy {}, BLAS sgemm {:.0} GFLOP/s); avb sgemm {}; faer sgemm {faer_rate:.0} GFLOP/s; {threads} threads.",
                r["versions"]["sklearn"].as_str().unwrap_or("?"),
                r["versions"]["numpy"].as_str().unwrap_or("?"),
                r["numpy_sgemm_gflops"].as_f64().unwrap_or(f64::NAN),
                avb_rate.map_or("not available on this CPU (faer computes the products)".into(), |r| format!("{r:.0} GFLOP/s (AVX2+FMA kernel)")),
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut table = String::from(
        "| n | d_src -> d_tgt | avb form | avb s (median) | scikit-learn s (median) | speed-up (ratio of medians) | speed-up per round: median (min-max) | avb GFLOP/s | of f32 GEMM ceiling | rel. diff of W vs sklearn |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in &rows {
        table.push_str(r);
        table.push('\n');
    }
    println!("{table}");
    if let Some(p) = &a.output {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let doc = format!(
            "# Benchmarks\n\n## Ridge fit (`avb bench ridge`)\n\nCommand: `{}`\n\nMachine: {cpu}, {threads} threads. Inputs: float32, activation-like synthetic pairs \
             (256-dim shared latent, per-dimension offsets, noise); lambda = {}; both fit an intercept on all n rows. Each of {} rounds runs a warm-up and a timed fit of each side, the order alternating between rounds so that \
             both see the same state of the machine; times are medians of the timed fits; \
             the GEMM ceiling is the fastest of avb's, faer's and numpy's measured sgemm rates in the same run; FLOPs count the classical algorithm's products and factorisation (avb computes general products with every dimension at least 2048, such as the primal form's cross product X^T Y, with one level of Strassen's scheme: 7/8 of their flops), so avb's rate is an effective one.\n\n{table}",
            crate::commands::created_by(),
            a.lambda,
            a.reps
        );
        avb_core::io::write_atomic(p, &[doc.as_bytes()])?;
    }
    Ok(())
}
