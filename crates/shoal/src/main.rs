//! The `shoal` command: glue over the library crates. It parses the command line, hands
//! each command to its module under `cli/` (parse, validate, run) and prints the error
//! chain once.

mod cli;

use clap::{Parser, Subcommand};
use cli::*;
use std::process::ExitCode;

/// shoal: a deep-learning training platform.
#[derive(Parser)]
#[command(name = "shoal", version, about)]
struct Cli {
    /// Threads for the tensor engine (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model.
    #[command(subcommand)]
    Train(TrainCmd),
    /// Translate lines from stdin with a trained NMT checkpoint.
    Translate(translate::TranslateArgs),
    /// Score translations with BLEU (sacreBLEU-compatible, 13a tokenisation).
    Eval(eval::EvalArgs),
    /// Average the parameters of NMT checkpoints into a new one (checkpoint averaging,
    /// as OpenNMT's and fairseq's): `average --last 3 --out avg runs/nmt`.
    Average(average::AverageArgs),
    /// Benchmarks (see bench/run, which runs them against their peers).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Predict step time and scaling of data-parallel training on a described cluster.
    Plan(plan::PlanArgs),
    /// Score rows of a click log with a trained CTR model.
    Predict(predict::PredictArgs),
    /// What a run, checkpoint or model file is: how it was made, its scores, the
    /// commands that use it (on a folder of runs: one line each).
    Info(info::InfoArgs),
    /// Data tools.
    #[command(subcommand)]
    Data(data::DataCmd),
    /// One process of a distributed job, its role taken from SHOAL_* environment
    /// variables (started by `train --workers`, or by a cluster scheduler).
    #[command(name = "role", hide = true)]
    Role,
    /// Compress a trained CNN (prune, quantize, factorize, chained, with fine-tuning) and
    /// report accuracy, size and measured speed-up; `--schedule` runs a table of them.
    Compress(compress::CompressArgs),
    /// Run a training job on Kubernetes (plain Jobs, Volcano or Kubeflow Trainer):
    /// `launch --k8s job.toml` prints the objects as YAML, `--apply` submits them;
    /// `launch status|logs|delete JOB` follow and clean up.
    Launch(launch::LaunchArgs),
    /// The coordinator of a job whose processes a cluster scheduler starts (`shoal
    /// role` in each): prepares the job directory from the training configuration,
    /// serves rendezvous and health checks, and exits when the job ends.
    Coordinator(coordinator::CoordinatorArgs),
    /// Run N copies of a command as one job on this machine (`shoal run -n 2 -- python
    /// train.py`): a PyTorch script with the `shoal` Python package gets shoal's
    /// allreduce; the others stop when one fails.
    Run(run::RunArgs),
}

#[derive(Subcommand)]
enum TrainCmd {
    /// The seed's NMT model (GRU encoder-decoder) on a parallel corpus.
    Nmt(train_nmt::NmtArgs),
    /// A click-through-rate model (LR, FM, DeepFM, Wide & Deep) on a click log.
    Ctr(train_ctr::CtrArgs),
    /// A VGG-style CNN with batch normalisation on Fashion-MNIST (or any IDX image set).
    Cnn(train_cnn::CnnArgs),
}

/// Keeps large buffers (a step's logits are tens of MB) in the heap for reuse instead of
/// mapping fresh pages from the kernel for every allocation: with glibc's defaults the
/// page faults of those first touches cost about a tenth of a training step.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// The error and its causes, each cause left out when a message above already says it
/// (library errors often show their source in their own message).
fn chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if !msg.contains(&c) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&c);
        }
    }
    msg
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    if !matches!(
        cli.cmd,
        Cmd::Train(_) | Cmd::Role | Cmd::Coordinator(_) | Cmd::Run(_)
    ) {
        // Commands whose output is piped (`shoal predict ... | head`) end quietly when
        // the reader goes away, as Unix tools do. Training keeps Rust's default (SIGPIPE
        // ignored) so that a peer's closed socket is an error naming it, not a silent
        // death.
        #[cfg(unix)]
        // SAFETY: restoring the default disposition of one signal before any threads start.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Some(t) = cli.threads {
        if t == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::from(2);
        }
        // The engine's thread pool reads this when it starts (nothing has run yet).
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let r = match cli.cmd {
        Cmd::Train(TrainCmd::Nmt(a)) => cli::train_nmt::run(a),
        Cmd::Train(TrainCmd::Ctr(a)) => cli::train_ctr::run(a),
        Cmd::Train(TrainCmd::Cnn(a)) => cli::train_cnn::run(a),
        Cmd::Predict(a) => cli::predict::run(a),
        Cmd::Info(a) => cli::info::run(a),
        Cmd::Data(data::DataCmd::GenCtr {
            rows,
            fields,
            ids_per_field,
            zipf,
            seed,
            out,
        }) => cli::data::run(rows, fields, ids_per_field, zipf, seed, out),
        Cmd::Translate(a) => cli::translate::run(a),
        Cmd::Eval(a) => cli::eval::run(a),
        Cmd::Average(a) => cli::average::run(a),
        Cmd::Bench(b) => cli::bench::run(b),
        Cmd::Role => cli::run_role(),
        Cmd::Coordinator(a) => cli::coordinator::run(a),
        Cmd::Run(a) => cli::run::run(a),
        Cmd::Launch(a) => cli::launch::run(a),
        Cmd::Compress(a) => cli::compress::run(a),
        Cmd::Plan(a) => cli::plan::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag and argument of every command has a description in `--help`.
    #[test]
    fn every_flag_is_described() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !builtin
                    && !a.is_hide_set()
                    && a.get_help().is_none()
                    && a.get_long_help().is_none()
                {
                    missing.push(format!("{path} --{}", a.get_id()));
                }
            }
            for s in c.get_subcommands() {
                if s.is_hide_set() || s.get_name() == "help" {
                    continue;
                }
                if s.get_about().is_none() && s.get_long_about().is_none() {
                    missing.push(format!("{path} {} (the command)", s.get_name()));
                }
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "shoal", &mut missing);
        assert!(missing.is_empty(), "without a description: {missing:#?}");
    }
}
