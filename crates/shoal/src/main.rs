//! The `shoal` command: a thin shell over the library crates (parse, validate, run).

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use shoal_train::config::{DistMode, NmtTrainConfig};
use shoal_train::progress::Progress;
use shoal_train::{NmtTrainer, Translator};
use std::io::{BufRead, Write};
use std::path::PathBuf;
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
    Translate(TranslateArgs),
    /// Score translations with BLEU (sacreBLEU-compatible, 13a tokenisation).
    Eval(EvalArgs),
    /// Benchmarks (see bench/run, which runs them against their peers).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Predict step time and scaling of data-parallel training on a described cluster.
    Plan(PlanArgs),
    /// Score rows of a click log with a trained CTR model.
    Predict(PredictArgs),
    /// Data tools.
    #[command(subcommand)]
    Data(DataCmd),
    /// One process of a distributed job, its role taken from SHOAL_* environment
    /// variables (started by `train --workers`, or by a cluster scheduler).
    #[command(name = "role", hide = true)]
    Role,
    /// Compress a trained CNN (prune, quantize, factorize, chained, with fine-tuning) and
    /// report accuracy, size and measured speed-up; `--schedule` runs a table of them.
    Compress(CompressArgs),
    /// Run a training job on Kubernetes (plain Jobs, Volcano or Kubeflow Trainer):
    /// `launch --k8s job.toml` prints the objects as YAML, `--apply` submits them;
    /// `launch status|logs|delete JOB` follow and clean up.
    Launch(LaunchArgs),
    /// The coordinator of a job whose processes a cluster scheduler starts (`shoal
    /// role` in each): prepares the job directory from the training configuration,
    /// serves rendezvous and health checks, and exits when the job ends.
    Coordinator(CoordinatorArgs),
}

#[derive(Args)]
struct CompressArgs {
    /// The trained model: a `train cnn` output directory, or an ONNX file (e.g. exported
    /// from PyTorch: Conv/BatchNormalization/Relu/MaxPool, then Gemm layers).
    #[arg(long)]
    model: PathBuf,
    /// Also write the (compressed) model as ONNX here (int8 as DequantizeLinear + int8
    /// weights; pruned and shared weights as their float values).
    #[arg(long)]
    onnx: Option<PathBuf>,
    /// Factorize the hidden fully-connected layers by SVD to this size ratio per layer.
    #[arg(long)]
    svd_ratio: Option<f64>,
    /// ... or at the rank keeping this share of the singular values' energy.
    #[arg(long)]
    svd_energy: Option<f64>,
    /// Fraction of fully-connected weights to prune (e.g. 0.9).
    #[arg(long, default_value_t = 0.0)]
    prune_fc: f64,
    /// Fraction of convolution weights to prune.
    #[arg(long, default_value_t = 0.0)]
    prune_conv: f64,
    /// One magnitude threshold over all weights (at --prune-fc) instead of per layer.
    #[arg(long)]
    prune_global: bool,
    /// int8 (per output channel), or a k-means codebook of this many bits (1-8).
    #[arg(long, value_name = "int8|BITS")]
    quant: Option<String>,
    /// Codebooks: entropy-constrained clustering at this rate (0: plain k-means; around
    /// 0.1 brings 2-bit codes to about 1.9 bits a weight after Huffman coding).
    #[arg(long, default_value_t = 0.0)]
    rate: f32,
    /// Fine-tuning updates after each stage (pruning ramps its sparsity over them).
    #[arg(long, default_value_t = 0)]
    fine_tune_steps: u64,
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    /// A TOML table of configurations (`[[config]]` with the fields above, snake_case)
    /// run one after the other into one report.
    #[arg(long, conflicts_with_all = ["svd_ratio", "svd_energy", "quant", "rate"])]
    schedule: Option<PathBuf>,
    /// Where the compressed model goes (one configuration).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Save the report as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Plot top-1 against compression ratio to this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print accuracy vs sparsity for each weight tensor pruned alone, and stop.
    #[arg(long)]
    sensitivity: bool,
    /// Use only the first N training / test images (0: the model's settings).
    #[arg(long, default_value_t = 0)]
    train_limit: usize,
    #[arg(long, default_value_t = 0)]
    test_limit: usize,
    /// Print the JSON report as the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct LaunchArgs {
    #[command(subcommand)]
    action: Option<LaunchAction>,
    /// The job spec (TOML: name, image, kind, config, workers, ps, data volume,
    /// resources; see README).
    #[arg(long, value_name = "JOB.toml")]
    k8s: Option<PathBuf>,
    /// Print the objects as YAML for `kubectl apply -f -` (the default).
    #[arg(long, conflicts_with = "apply")]
    dry_run: bool,
    /// Submit the objects through the Kubernetes API (kubeconfig or in-cluster
    /// account; needs a build with `--features k8s`).
    #[arg(long)]
    apply: bool,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    namespace: Option<String>,
    /// kubernetes (indexed Jobs + headless Service), volcano (gang-scheduled) or
    /// kubeflow (Trainer TrainJob).
    #[arg(long)]
    scheduler: Option<String>,
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    workers: Option<i64>,
    #[arg(long)]
    ps: Option<i64>,
    #[arg(long)]
    gpus_per_worker: Option<i64>,
}

#[derive(Subcommand)]
enum LaunchAction {
    /// The job's Jobs and pods and where they stand.
    Status(LaunchJobArgs),
    /// The logs of the job's pods.
    Logs {
        #[command(flatten)]
        job: LaunchJobArgs,
        /// Only the last N lines of each pod.
        #[arg(long)]
        tail: Option<i64>,
    },
    /// Delete every object of the job (its pods go with them).
    Delete(LaunchJobArgs),
}

#[derive(Args)]
struct LaunchJobArgs {
    /// The job's name.
    job: String,
    #[arg(long, default_value = "default")]
    namespace: String,
}

#[derive(Args)]
struct CoordinatorArgs {
    /// What the job trains.
    #[arg(long, value_parser = ["nmt", "ctr"])]
    kind: String,
    /// Its training configuration (TOML; for ctr the fields of `train ctr`).
    #[arg(long)]
    config: PathBuf,
    /// Address to serve the control plane on (port 0: a free port, picked by the
    /// system). Once bound, stderr says `coordinator listening on ADDR`.
    #[arg(long, default_value = "0.0.0.0:7070")]
    listen: std::net::SocketAddr,
    /// The run directory shared by the job's processes (default: $SHOAL_RUN_DIR).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Fail if the job's processes have not all registered within this many seconds.
    #[arg(long, default_value_t = 900.0)]
    rendezvous_timeout_s: f64,
}

#[derive(Subcommand)]
enum TrainCmd {
    /// The seed's NMT model (GRU encoder-decoder) on a parallel corpus.
    Nmt(NmtArgs),
    /// A click-through-rate model (LR, FM, DeepFM, Wide & Deep) on a click log.
    Ctr(CtrArgs),
    /// A VGG-style CNN with batch normalisation on Fashion-MNIST (or any IDX image set).
    Cnn(CnnArgs),
}

#[derive(Args)]
struct CnnArgs {
    /// Directory of the IDX files (train-images-idx3-ubyte[.gz], ...); Debian's
    /// dataset-fashion-mnist installs them in the default.
    #[arg(long, default_value = shoal_data::images::FASHION_MNIST_DIR)]
    data_dir: PathBuf,
    /// Convolution widths per block, blocks separated by '/', each closed by 2x2 pooling.
    #[arg(long, default_value = "32,32/64,64")]
    blocks: String,
    /// Hidden widths of the fully-connected head.
    #[arg(long, default_value = "512,512")]
    fc: String,
    #[arg(long, default_value_t = 0.25)]
    dropout: f32,
    /// No batch normalisation (convolutions get biases).
    #[arg(long)]
    no_batch_norm: bool,
    #[arg(long, default_value_t = 3)]
    epochs: u64,
    /// Stop after this many updates (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_steps: u64,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Use only the first N training / test images (0: all).
    #[arg(long, default_value_t = 0)]
    train_limit: usize,
    #[arg(long, default_value_t = 0)]
    test_limit: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the model is saved.
    #[arg(long, default_value = "runs/cnn")]
    out: PathBuf,
    /// Print a JSON summary as the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum CtrModelArg {
    Lr,
    Fm,
    Deepfm,
    WideDeep,
}

#[derive(Clone, Copy, ValueEnum)]
enum SparseOpt {
    Sgd,
    Adagrad,
    RowAdagrad,
    LazyAdam,
    Ftrl,
}

fn sparse_rule(o: SparseOpt) -> shoal_optim::SparseRule {
    use shoal_optim::SparseRule;
    match o {
        SparseOpt::Sgd => SparseRule::Sgd,
        SparseOpt::Adagrad => SparseRule::Adagrad { eps: 1e-8 },
        SparseOpt::RowAdagrad => SparseRule::RowAdagrad { eps: 1e-8 },
        SparseOpt::LazyAdam => SparseRule::LazyAdam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        SparseOpt::Ftrl => SparseRule::Ftrl {
            beta: 1.0,
            l1: 0.0,
            l2: 0.0,
        },
    }
}

#[derive(Args)]
struct CtrArgs {
    #[arg(long, value_enum, default_value = "deepfm")]
    model: CtrModelArg,
    /// Click log: CSV with a header (Criteo: label,I1..I13,C1..C26; Avazu: id,click,...)
    /// libffm (`label field:feature:value ...`) or libsvm with one feature per field
    /// (`label feature:value ...`).
    #[arg(long, required_unless_present = "resume")]
    data: Option<PathBuf>,
    /// Continue the run saved in this model directory (one process; --epochs and
    /// --max-steps may change).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Skip malformed rows (counted) instead of stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Fraction of rows held out for AUC and log loss.
    #[arg(long, default_value_t = 0.1)]
    valid_fraction: f64,
    /// Planted probabilities (from `shoal data gen-ctr`) to report the best AUC.
    #[arg(long)]
    planted: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    dim: usize,
    /// MLP hidden widths, comma-separated.
    #[arg(long, default_value = "128,64")]
    hidden: String,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    #[arg(long, default_value_t = 0)]
    max_steps: u64,
    /// Dense (MLP) learning rate, Adam.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Sparse rows' learning rate.
    #[arg(long, default_value_t = 0.05)]
    sparse_lr: f32,
    #[arg(long, value_enum, default_value = "adagrad")]
    sparse_opt: SparseOpt,
    /// Frequency filter: keys seen in fewer training rows share a per-field row.
    #[arg(long, default_value_t = 1)]
    min_count: u32,
    /// Eviction: every N updates, drop the rows not updated in the last N (0: off).
    #[arg(long, default_value_t = 0)]
    evict_idle_steps: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to save the model.
    #[arg(long, default_value = "runs/ctr")]
    out: PathBuf,
    /// Worker processes (the rows then live on parameter servers: give --ps).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Parameter-server shards (sets --mode ps-sync unless given).
    #[arg(long, default_value_t = 0)]
    ps: usize,
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    #[arg(long, value_enum, default_value = "separate")]
    ps_placement: PsPlacement,
    /// Print the final scores as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PredictArgs {
    /// A model saved by `shoal train ctr`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Rows to score (CSV with the training file's columns; a label column is optional).
    #[arg(long)]
    data: PathBuf,
    /// Write one probability per row here (default: stdout).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    skip_bad_rows: bool,
}

#[derive(Subcommand)]
enum DataCmd {
    /// Synthetic click logs with Zipf-distributed ids drawn from a planted FM model.
    GenCtr {
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        #[arg(long, default_value_t = 20)]
        fields: usize,
        /// Possible ids per field (up to 10^10 and more).
        #[arg(long, default_value_t = 1_000_000)]
        ids_per_field: u64,
        #[arg(long, default_value_t = 1.1)]
        zipf: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output CSV; the planted probabilities go to OUT.p.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Cell {
    Gru,
    Lstm,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Allreduce,
    PsSync,
    PsAsync,
}

#[derive(Clone, Copy, ValueEnum)]
enum PsPlacement {
    Colocated,
    Separate,
}

#[derive(Clone, Copy, ValueEnum)]
enum Plane {
    Shm,
    Tcp,
}

#[derive(Clone, Copy, ValueEnum)]
enum Attn {
    None,
    Luong,
    Bahdanau,
}

#[derive(Args)]
struct NmtArgs {
    /// TOML configuration file (sections [model], [data], [train], [eval]).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any configuration field, e.g. --set model.hidden=256 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run directory for checkpoints.
    #[arg(long, default_value = "runs/nmt")]
    out: PathBuf,
    /// Continue the run saved in this run or checkpoint directory.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Directory with train.{en,de} and val.{en,de} (sets the four data paths).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// train.epochs
    #[arg(long)]
    epochs: Option<u64>,
    /// train.max_steps (0 = no limit)
    #[arg(long)]
    max_steps: Option<u64>,
    /// train.max_minutes (0 = no limit)
    #[arg(long)]
    max_minutes: Option<f64>,
    /// train.batch_size
    #[arg(long)]
    batch_size: Option<usize>,
    /// train.lr
    #[arg(long)]
    lr: Option<f32>,
    /// train.seed
    #[arg(long)]
    seed: Option<u64>,
    /// train.checkpoint_every (updates; 0 = only at the end)
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// model.cell
    #[arg(long, value_enum)]
    cell: Option<Cell>,
    /// model.attention
    #[arg(long, value_enum)]
    attention: Option<Attn>,
    /// model.layer_norm: Layer Normalization inside the recurrent cell.
    #[arg(long)]
    layer_norm: bool,
    /// model.dropout
    #[arg(long)]
    dropout: Option<f32>,
    /// dist.workers: data-parallel worker processes (train.batch_size is per worker).
    #[arg(long)]
    workers: Option<usize>,
    /// dist.ps: parameter-server shards (sets --mode ps-sync unless given).
    #[arg(long)]
    ps: Option<usize>,
    /// dist.mode: how workers combine gradients.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// dist.placement: shards in their own processes or inside the first workers.
    #[arg(long, value_enum)]
    ps_placement: Option<PsPlacement>,
    /// dist.transport: the allreduce data plane.
    #[arg(long, value_enum)]
    transport: Option<Plane>,
    /// eval.beam for the final BLEU (1 = greedy)
    #[arg(long)]
    beam: Option<usize>,
    /// Skip the BLEU evaluation at the end.
    #[arg(long)]
    no_eval: bool,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Print the effective configuration (TOML) and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args)]
struct TranslateArgs {
    /// A checkpoint directory or a run directory (its latest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Beam width (1 = greedy).
    #[arg(long, default_value_t = 1)]
    beam: usize,
    /// Length-penalty exponent for beam search.
    #[arg(long, default_value_t = 0.6)]
    alpha: f32,
}

#[derive(Args)]
struct EvalArgs {
    /// Hypothesis file, one translation per line (or use --checkpoint and --src).
    #[arg(long)]
    hyp: Option<PathBuf>,
    /// Reference file, one line per hypothesis.
    #[arg(long = "ref")]
    reference: PathBuf,
    /// Translate --src with this checkpoint, then score.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Source file to translate (with --checkpoint).
    #[arg(long)]
    src: Option<PathBuf>,
    /// Beam width when translating (1 = greedy).
    #[arg(long, default_value_t = 1)]
    beam: usize,
    #[arg(long, default_value_t = 0.6)]
    alpha: f32,
    /// Also write the translations here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the score as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PlanArgs {
    /// The seed's 2-node, 8-GPU cluster and workload (our stated assumptions), with its
    /// published table next to the prediction.
    #[arg(long)]
    seed: bool,
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    #[arg(long, default_value_t = 2)]
    workers_per_node: usize,
    /// Cores per host for parallel local streams (default: this machine's).
    #[arg(long)]
    cores_per_node: Option<usize>,
    /// Inter-node bandwidth, GB/s (one direction).
    #[arg(long, default_value_t = 1.1)]
    inter_gbs: f64,
    #[arg(long, default_value_t = 50.0)]
    inter_latency_us: f64,
    /// Allreduce data plane within a host, GB/s (default: measured here, shared memory).
    #[arg(long)]
    intra_gbs: Option<f64>,
    /// One local worker-shard stream, GB/s (default: measured here, loopback TCP).
    #[arg(long)]
    stream_gbs: Option<f64>,
    /// Compute per step per worker without the optimizer, ms (default: measured here).
    #[arg(long)]
    compute_ms: Option<f64>,
    /// Optimizer cost, ns per value (default: measured here).
    #[arg(long)]
    opt_ns: Option<f64>,
    /// Gradient values exchanged per step (default: the seed NMT model's parameters).
    #[arg(long)]
    values: Option<f64>,
    /// Target words per worker per step (default: measured here).
    #[arg(long)]
    words_per_step: Option<f64>,
    #[arg(long, default_value = "../shared/data/multi30k")]
    data_dir: PathBuf,
    /// Print the predictions as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// NMT training throughput (seed model, no attention), on fixed batches.
    NmtTrain {
        #[arg(long, default_value_t = 60)]
        steps: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Write the batches here for the PyTorch peer.
        #[arg(long)]
        dump_batches: Option<PathBuf>,
        #[arg(long, default_value = "../shared/data/multi30k")]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value = "gru")]
        cell: Cell,
        #[arg(long)]
        layer_norm: bool,
        /// Run the engine's step-by-step recurrence instead of the fused operation.
        #[arg(long)]
        unfused: bool,
    },
    /// Allreduce of one buffer over N ranks (threads of this process).
    Allreduce {
        /// local, shm or tcp
        #[arg(long, default_value = "shm")]
        transport: String,
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        /// Sizes in MB, comma-separated.
        #[arg(long, default_value = "1,16,64")]
        sizes: String,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Ranks as processes (this program started once per rank) instead of threads
        /// (shm only).
        #[arg(long)]
        processes: bool,
        /// Internal: run as rank R of a group of processes named by --job.
        #[arg(long, hide = true, requires = "job")]
        rank: Option<usize>,
        #[arg(long, hide = true)]
        job: Option<String>,
    },
    /// Push + pull of a gradient between two ranks (threads) over shared memory and TCP,
    /// and through a tonic gRPC service, per size.
    Transport {
        /// Sizes in MB, comma-separated.
        #[arg(long, default_value = "16,64")]
        sizes: String,
        #[arg(long, default_value_t = 10)]
        iters: usize,
    },
    /// Synchronous parameter-server steps (push + Adam + pull) of 2 workers (threads) with
    /// 1 and 2 shards, per gradient size.
    PsShards {
        /// Sizes in MB, comma-separated.
        #[arg(long, default_value = "16")]
        sizes: String,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, default_value_t = 10)]
        iters: usize,
    },
    /// Sparse rows at scale: bytes per touched row, rows created per second, and sparse
    /// push + pull rows per second through 1 and 2 parameter-server shards.
    CtrScale {
        /// Distinct keys to create.
        #[arg(long, default_value_t = 10_000_000)]
        rows: usize,
        /// Values per row (DeepFM: 1 + embedding dim).
        #[arg(long, default_value_t = 9)]
        dim: usize,
        /// Update rule of the rows (its state is part of each row's bytes).
        #[arg(long, value_enum, default_value = "row-adagrad")]
        rule: SparseOpt,
        #[arg(long, default_value_t = 20_000)]
        ps_keys: usize,
        #[arg(long, default_value_t = 30)]
        ps_steps: usize,
    },
    /// One recurrent layer, forward + backward, on random input.
    RnnLayer {
        #[arg(long, value_enum, default_value = "gru")]
        cell: Cell,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        hidden: usize,
        /// Input size (default: the hidden size).
        #[arg(long)]
        input: Option<usize>,
        #[arg(long, default_value_t = 20)]
        len: usize,
        #[arg(long, default_value_t = 50)]
        iters: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Run the engine's step-by-step recurrence instead of the fused operation.
        #[arg(long)]
        unfused: bool,
    },
}

fn overrides(a: &NmtArgs) -> Result<Vec<(String, String)>> {
    let mut o = Vec::new();
    for kv in &a.set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
        o.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut put = |k: &str, v: String| o.push((k.to_string(), v));
    if let Some(d) = &a.data_dir {
        for (k, f) in [
            ("data.train_src", "train.en"),
            ("data.train_tgt", "train.de"),
            ("data.valid_src", "val.en"),
            ("data.valid_tgt", "val.de"),
        ] {
            put(k, format!("{:?}", d.join(f).display().to_string()));
        }
    }
    if let Some(v) = a.epochs {
        put("train.epochs", v.to_string());
    }
    if let Some(v) = a.max_steps {
        put("train.max_steps", v.to_string());
    }
    if let Some(v) = a.max_minutes {
        put("train.max_minutes", format!("{v:?}"));
    }
    if let Some(v) = a.batch_size {
        put("train.batch_size", v.to_string());
    }
    if let Some(v) = a.lr {
        put("train.lr", format!("{v:?}"));
    }
    if let Some(v) = a.seed {
        put("train.seed", v.to_string());
    }
    if let Some(v) = a.checkpoint_every {
        put("train.checkpoint_every", v.to_string());
    }
    if let Some(c) = a.cell {
        put("model.cell", format!("{:?}", value_name(c)));
    }
    if let Some(at) = a.attention {
        put("model.attention", format!("{:?}", value_name(at)));
    }
    if a.layer_norm {
        put("model.layer_norm", "true".into());
    }
    if let Some(v) = a.dropout {
        put("model.dropout", format!("{v:?}"));
    }
    if let Some(v) = a.beam {
        put("eval.beam", v.to_string());
    }
    if let Some(v) = a.workers {
        put("dist.workers", v.to_string());
    }
    if let Some(v) = a.ps {
        put("dist.ps", v.to_string());
        if a.mode.is_none() && v > 0 {
            put("dist.mode", "\"ps-sync\"".into());
        }
    }
    if let Some(m) = a.mode {
        put("dist.mode", format!("{:?}", value_name(m)));
        if a.ps.is_none() && !matches!(m, Mode::Allreduce) {
            put("dist.ps", "1".into());
        }
    }
    if let Some(p) = a.ps_placement {
        put("dist.placement", format!("{:?}", value_name(p)));
    }
    if let Some(p) = a.transport {
        put("dist.transport", format!("{:?}", value_name(p)));
    }
    Ok(o)
}

/// A command-line choice's value name: kebab-case, as the configuration spells it.
fn value_name(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// The library value a command-line choice names, through the configuration's names
/// (one spelling for flags, TOML and checkpoints).
fn lib_value<T: serde::de::DeserializeOwned>(v: impl ValueEnum) -> Result<T> {
    let name = value_name(v);
    serde_json::from_value(serde_json::Value::String(name.clone()))
        .with_context(|| format!("'{name}' names no configuration value"))
}

fn train_nmt(a: NmtArgs) -> Result<()> {
    let ov = overrides(&a)?;
    if a.resume.is_none() && !a.print_config {
        let cfg = NmtTrainConfig::load(a.config.as_deref(), &ov)?;
        if cfg.dist.is_cluster() {
            return train_nmt_cluster(&a, cfg, None);
        }
    }
    let mut trainer = match &a.resume {
        Some(dir) => {
            if a.config.is_some() {
                bail!("--resume continues with the run's saved configuration; drop --config");
            }
            let t = NmtTrainer::resume(dir, |saved| saved.with_overrides(&ov))?;
            if t.config().dist.is_cluster() {
                let cfg = t.config().clone();
                let tok = t.tokenizers().clone();
                drop(t);
                return train_nmt_cluster(&a, cfg, Some((dir.clone(), tok)));
            }
            t
        }
        None => {
            let cfg = NmtTrainConfig::load(a.config.as_deref(), &ov)?;
            if a.print_config {
                print!("{}", cfg.to_toml());
                return Ok(());
            }
            let threads = cfg.train.threads;
            if threads > 0 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
                // The thread pool starts with the first parallel operation, after this.
                std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
            }
            eprintln!("preparing data and learning subword vocabularies...");
            NmtTrainer::new(cfg, &a.out)?
        }
    };
    let epochs = trainer.config().train.epochs;
    let mut progress = Progress::new(epochs, false);
    let summary = trainer.run(|e| progress.on_event(e));
    progress.finish();
    let summary = summary?;
    eprintln!(
        "trained {} steps in {:.0} s ({:.0} target tokens/s); stopped: {:?}; checkpoint {}",
        summary.steps,
        summary.seconds,
        summary.tokens_per_s,
        summary.stop,
        summary.last_checkpoint.display()
    );
    let out = serde_json::json!({
        "steps": trainer.position().step,
        "seconds": summary.seconds,
        "tokens_per_s": summary.tokens_per_s,
        "checkpoint": summary.last_checkpoint,
        "params": trainer.num_params(),
        "timing": [trainer.timing()],
    });
    final_report(&a, &trainer, out)
}

/// Validation loss, BLEU and samples of a trained model; the JSON summary with `--json`.
fn final_report(a: &NmtArgs, trainer: &NmtTrainer, mut out: serde_json::Value) -> Result<()> {
    let valid_loss = trainer.valid_loss()?;
    out["valid_loss"] = serde_json::json!(valid_loss);
    println!(
        "validation loss {valid_loss:.3} (perplexity {:.1})",
        valid_loss.exp()
    );
    if !a.no_eval {
        let (bleu, samples) = trainer.valid_bleu()?;
        println!("validation {bleu}");
        let n = trainer.config().eval.samples;
        for s in samples.iter().take(n) {
            println!(
                "  src: {}\n  ref: {}\n  hyp: {}\n",
                s.source, s.reference, s.hypothesis
            );
        }
        out["bleu"] = serde_json::json!(bleu.score);
    }
    if a.json {
        println!("{out}");
    }
    Ok(())
}

/// A distributed run: the launcher starts the coordinator, workers and parameter
/// servers as processes of this program and shows their progress.
fn train_nmt_cluster(
    a: &NmtArgs,
    cfg: NmtTrainConfig,
    resume: Option<(PathBuf, shoal_train::nmt::Tokenizers)>,
) -> Result<()> {
    let (run_dir, tok, resume) = match resume {
        Some((dir, tok)) => {
            let ckpt = shoal_train::checkpoint::resolve(&dir)?;
            let run = ckpt.parent().map(PathBuf::from).unwrap_or_default();
            (run, tok, Some(ckpt))
        }
        None => {
            eprintln!("preparing data and learning subword vocabularies...");
            (a.out.clone(), NmtTrainer::learn_tokenizers(&cfg)?, None)
        }
    };
    let d = &cfg.dist;
    eprintln!(
        "starting {} workers{} on this machine (mode {:?}); logs in {}",
        d.workers,
        if d.mode == shoal_train::config::DistMode::Allreduce {
            String::new()
        } else {
            format!(" and {} parameter-server shards ({:?})", d.ps, d.placement)
        },
        d.mode,
        run_dir.join("job/logs").display()
    );
    let opts = shoal_train::cluster::LaunchOptions {
        exe: std::env::current_exe().context("finding this program's path")?,
        args: vec!["role".into()],
        resume,
    };
    let mut progress = Progress::new(cfg.train.epochs, false);
    let summary = shoal_train::cluster::launch(&cfg, &run_dir, &tok, &opts, |e, rates| {
        let per: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        progress.set_detail(format!(" (workers: {})", per.join(" + ")));
        progress.on_event(e);
    });
    progress.finish();
    let summary = summary?;
    let per: Vec<String> = summary
        .worker_tokens_per_s
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect();
    eprintln!(
        "trained {} steps in {:.0} s: {:.0} target tokens/s ({} per worker); checkpoint {}",
        summary.steps,
        summary.seconds,
        summary.tokens_per_s,
        per.join(" + "),
        summary.last_checkpoint.display()
    );
    let trainer = NmtTrainer::resume(&summary.last_checkpoint, |c| Ok(c.clone()))?;
    let out = serde_json::json!({
        "steps": trainer.position().step,
        "seconds": summary.seconds,
        "tokens_per_s": summary.tokens_per_s,
        "params": trainer.num_params(),
        "worker_tokens_per_s": summary.worker_tokens_per_s,
        "timing": summary.timing,
        "checkpoint": summary.last_checkpoint,
    });
    final_report(a, &trainer, out)
}

fn plan(a: PlanArgs) -> Result<()> {
    use shoal_train::plan::{self, Cluster, Link, Strategy};
    let positive = |name: &str, v: Option<f64>| match v {
        Some(x) if !(x > 0.0 && x.is_finite()) => bail!("--{name} must be positive, got {x}"),
        _ => Ok(()),
    };
    positive("inter-gbs", Some(a.inter_gbs))?;
    positive("intra-gbs", a.intra_gbs)?;
    positive("stream-gbs", a.stream_gbs)?;
    positive("compute-ms", a.compute_ms)?;
    positive("values", a.values)?;
    positive("words-per-step", a.words_per_step)?;
    if a.inter_latency_us < 0.0 || a.opt_ns.is_some_and(|x| x < 0.0) {
        bail!("--inter-latency-us and --opt-ns must be >= 0");
    }
    if a.nodes == 0 || a.workers_per_node == 0 || a.cores_per_node == Some(0) {
        bail!("--nodes, --workers-per-node and --cores-per-node must be at least 1");
    }
    let gbs = |x: f64, lat_us: f64| Link {
        bytes_per_s: x * 1e9,
        latency_s: lat_us * 1e-6,
    };
    if a.seed {
        let w = plan::seed_workload();
        println!(
            "seed workload (assumed): {:.1} MB of gradient per step, compute {:.0} ms + optimizer {:.0} ms per step, {:.0} words per step",
            w.grad_bytes / 1e6,
            w.compute_s * 1e3,
            w.opt_values * w.opt_s_per_value * 1e3,
            w.words_per_step
        );
        println!("seed cluster (assumed): 10 GbE at 1.1 GB/s between 2 hosts, 4 GPUs per host\n");
        println!(
            "{:<40} {:>9} {:>8} {:>10} {:>8}   bottleneck",
            "setup", "seed w/s", "seed x", "shoal w/s", "model x"
        );
        let mut rows = Vec::new();
        for (name, nodes, per, strat, words) in plan::SEED_TABLE {
            let c = plan::seed_cluster(nodes, per);
            let p = match strat {
                Some(s) => plan::predict(&w, &c, s),
                None => plan::predict(&w, &plan::seed_cluster(1, 1), Strategy::Allreduce),
            };
            println!(
                "{name:<40} {words:>9.0} {:>8.2} {:>10.0} {:>8.2}   {}",
                words / 5277.0,
                p.words_per_s,
                p.speedup,
                p.bottleneck
            );
            rows.push(
                serde_json::json!({"setup": name, "seed_words_per_s": words, "predicted": p}),
            );
        }
        let c = plan::seed_cluster(2, 4);
        let best = plan::candidates(&w, &c);
        println!("\nshoal's options on the same 2 x 4 cluster (fastest first):");
        print_predictions(&best[..best.len().min(6)]);
        let rec = &best[0];
        println!(
            "\nrecommended: {} -> {:.0} words/s, speed-up {:.2}, efficiency {:.0}% (seed's best: 23,316 words/s, 4.42x, 55%)",
            rec.strategy,
            rec.words_per_s,
            rec.speedup,
            rec.efficiency * 100.0
        );
        println!(
            "\nwhy: a parameter server receives every remote worker's gradient through its \
             host's one link and applies the optimizer for all of them; colocating it keeps \
             the local workers' traffic off the network, and more shards spread the rest \
             (the seed's 1.44x -> 2.93x -> 4.42x). Allreduce has no such hotspot: shoal's \
             two-level allreduce sums within each host first, so each gradient byte crosses \
             the network once per host and direction, and every worker applies the optimizer \
             to its own copy in parallel."
        );
        if a.json {
            println!("{}", serde_json::json!({"seed": rows, "options": best}));
        }
        return Ok(());
    }
    let mut w = if a.compute_ms.is_none() || a.opt_ns.is_none() || a.words_per_step.is_none() {
        eprintln!("measuring the seed NMT model's step on this machine (1 thread)...");
        shoal_train::bench::plan_workload(&a.data_dir, |m| eprintln!("  {m}"))?
    } else {
        plan::Workload {
            grad_bytes: 0.0,
            opt_values: 0.0,
            opt_s_per_value: 0.0,
            compute_s: 0.0,
            words_per_step: 0.0,
        }
    };
    if let Some(v) = a.values {
        w.grad_bytes = 4.0 * v;
        w.opt_values = v;
    }
    if w.opt_values <= 0.0 {
        bail!("give --values (gradient values per step) or let shoal measure the seed model");
    }
    if let Some(x) = a.compute_ms {
        w.compute_s = x / 1e3;
    }
    if let Some(x) = a.opt_ns {
        w.opt_s_per_value = x * 1e-9;
    }
    if let Some(x) = a.words_per_step {
        w.words_per_step = x;
    }
    let (mut intra, mut stream) = if a.intra_gbs.is_none() || a.stream_gbs.is_none() {
        eprintln!("timing 2-rank allreduces of the gradient over shared memory and TCP...");
        shoal_train::bench::plan_links(w.grad_bytes as usize)?
    } else {
        (gbs(1.0, 5.0), gbs(1.0, 30.0))
    };
    if let Some(x) = a.intra_gbs {
        intra = gbs(x, 5.0);
    }
    if let Some(x) = a.stream_gbs {
        stream = gbs(x, 30.0);
    }
    let c = Cluster {
        nodes: a.nodes,
        workers_per_node: a.workers_per_node,
        cores_per_node: a.cores_per_node.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        inter: gbs(a.inter_gbs, a.inter_latency_us),
        intra,
        local_stream: stream,
    };
    let preds = plan::candidates(&w, &c);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"workload": w, "cluster": c, "single_step_s": plan::single(&w), "options": preds})
        );
        return Ok(());
    }
    println!(
        "workload: {:.1} MB of gradient, compute {:.1} ms + optimizer {:.1} ms per step, {:.0} words per step",
        w.grad_bytes / 1e6,
        w.compute_s * 1e3,
        w.opt_values * w.opt_s_per_value * 1e3,
        w.words_per_step
    );
    println!(
        "cluster: {} node(s) x {} workers, {} cores each; inter {:.2} GB/s, intra {:.2} GB/s, local stream {:.2} GB/s\n",
        c.nodes,
        c.workers_per_node,
        c.cores_per_node,
        c.inter.bytes_per_s / 1e9,
        c.intra.bytes_per_s / 1e9,
        c.local_stream.bytes_per_s / 1e9
    );
    print_predictions(&preds);
    Ok(())
}

fn print_predictions(preds: &[shoal_train::plan::Prediction]) {
    println!(
        "{:<18} {:>8} {:>8} {:>8} {:>9} {:>8} {:>6}   bottleneck",
        "option", "step ms", "comm ms", "opt ms", "words/s", "speed-up", "effic."
    );
    for p in preds {
        println!(
            "{:<18} {:>8.1} {:>8.1} {:>8.1} {:>9.0} {:>8.2} {:>5.0}%   {}",
            p.strategy.to_string(),
            p.step_s * 1e3,
            p.comm_s * 1e3,
            p.optimizer_s * 1e3,
            p.words_per_s,
            p.speedup,
            p.efficiency * 100.0,
            p.bottleneck
        );
    }
}

fn train_ctr(a: CtrArgs) -> Result<()> {
    use shoal_train::ctr::{CtrTrainConfig, CtrTrainer};
    let hidden = a
        .hidden
        .split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("--hidden '{}': expected widths like 128,64", a.hidden))?;
    let cfg = CtrTrainConfig {
        kind: lib_value(a.model)?,
        dim: a.dim,
        hidden,
        data: a.data.clone().unwrap_or_default(),
        skip_bad_rows: a.skip_bad_rows,
        valid_fraction: a.valid_fraction,
        planted: a.planted.clone(),
        batch_size: a.batch_size,
        epochs: a.epochs,
        max_steps: a.max_steps,
        lr: a.lr,
        sparse_lr: a.sparse_lr,
        sparse_rule: sparse_rule(a.sparse_opt),
        min_count: a.min_count,
        evict_idle_steps: a.evict_idle_steps,
        dist: shoal_train::config::DistSection {
            workers: a.workers,
            ps: a.ps,
            mode: match (a.mode, a.ps) {
                (Some(m), _) => lib_value(m)?,
                (None, 0) => DistMode::Allreduce,
                (None, _) => DistMode::PsSync,
            },
            placement: lib_value(a.ps_placement)?,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut t = match &a.resume {
        Some(dir) => {
            let saved = shoal_train::ctr::CtrTrainConfig::saved_in(dir)?;
            if saved.dist.is_cluster() {
                let cfg = shoal_train::ctr::CtrTrainConfig {
                    epochs: a.epochs,
                    max_steps: a.max_steps,
                    ..saved
                };
                return train_ctr_cluster(&a, cfg, Some(dir.clone()));
            }
            eprintln!("resuming {}...", dir.display());
            let (epochs, max_steps) = (a.epochs, a.max_steps);
            CtrTrainer::resume(dir, |c| {
                c.epochs = epochs;
                c.max_steps = max_steps;
            })?
        }
        None => {
            cfg.validate()?;
            if cfg.dist.is_cluster() {
                return train_ctr_cluster(&a, cfg, None);
            }
            eprintln!("reading {}...", cfg.data.display());
            CtrTrainer::new(cfg)?
        }
    };
    let mut progress = shoal_train::progress::CtrProgress::new(a.epochs);
    let eval = t.run(|e| progress.on_event(e));
    progress.finish();
    let eval = eval?;
    t.save(&a.out)?;
    println!(
        "held-out AUC {:.4}, logloss {:.4}; {} sparse rows; model saved to {}",
        eval.auc,
        eval.logloss,
        t.table.len(),
        a.out.display()
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({"auc": eval.auc, "logloss": eval.logloss, "planted_auc": eval.planted_auc,
                "examples_per_s": t.examples_trained as f64 / t.train_seconds.max(1e-9),
                "train_seconds": t.train_seconds,
                "rows_touched": t.table.len(), "table_bytes": t.table.bytes(), "checkpoint": a.out})
        );
    }
    Ok(())
}

/// CTR training as worker and shard processes of this program.
fn train_ctr_cluster(
    a: &CtrArgs,
    cfg: shoal_train::ctr::CtrTrainConfig,
    resume: Option<PathBuf>,
) -> Result<()> {
    use shoal_train::cluster::{launch_job, write_ctr_job, CtrJob, LaunchOptions, Report};
    let run_dir = PathBuf::from(format!("{}.cluster", a.out.display()));
    let d = cfg.dist.clone();
    write_ctr_job(
        &run_dir,
        &CtrJob {
            cfg,
            out: a.out.clone(),
        },
    )?;
    eprintln!(
        "starting {} workers and {} parameter-server shards ({:?}, {:?}); logs in {}",
        d.workers,
        d.ps,
        d.mode,
        d.placement,
        run_dir.join("job/logs").display()
    );
    // A resumed job reads its checkpoint before the model is saved over it.
    let resume = match resume {
        Some(dir) if dir == a.out => {
            let copy = run_dir.join("resume-from");
            let _ = std::fs::remove_dir_all(&copy);
            std::fs::create_dir_all(&copy)?;
            std::fs::copy(
                dir.join("model.safetensors"),
                copy.join("model.safetensors"),
            )
            .with_context(|| format!("copying {}", dir.display()))?;
            Some(copy)
        }
        other => other,
    };
    let opts = LaunchOptions {
        exe: std::env::current_exe().context("finding this program's path")?,
        args: vec!["role".into()],
        resume,
    };
    let mut last = std::time::Instant::now();
    let mut eval = None;
    let summary = launch_job(&d, 1, &run_dir, &opts, |r, rates| match r {
        Report::Step {
            rank: 0,
            step,
            epoch,
            loss,
            ..
        } if last.elapsed().as_secs_f64() >= 5.0 => {
            last = std::time::Instant::now();
            let per: Vec<String> = rates.iter().map(|x| format!("{x:.0}")).collect();
            eprintln!(
                "epoch {} step {step}: logloss {loss:.4}, {:.0} examples/s (workers: {})",
                epoch + 1,
                rates.iter().sum::<f64>(),
                per.join(" + ")
            );
        }
        Report::CtrEval {
            epoch,
            auc,
            logloss,
            planted_auc,
        } => {
            eprintln!(
                "epoch {} held-out AUC {auc:.4}, logloss {logloss:.4}{}",
                epoch + 1,
                planted_auc
                    .map(|p| format!(" (planted model's AUC {p:.4})"))
                    .unwrap_or_default()
            );
            eval = Some((*auc, *logloss, *planted_auc));
        }
        _ => {}
    })?;
    let (auc, logloss, planted_auc) = eval.context("worker 0 reported no evaluation")?;
    println!(
        "held-out AUC {auc:.4}, logloss {logloss:.4}; {:.0} examples/s ({} per worker); model saved to {}",
        summary.tokens_per_s,
        summary
            .worker_tokens_per_s
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" + "),
        a.out.display()
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({"auc": auc, "logloss": logloss, "planted_auc": planted_auc,
                "examples_per_s": summary.tokens_per_s, "worker_examples_per_s": summary.worker_tokens_per_s,
                "checkpoint": a.out})
        );
    }
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let mut p = shoal_train::ctr::CtrPredictor::load(&a.checkpoint)?;
    let bad = if a.skip_bad_rows {
        shoal_data::ctr::BadRows::Skip
    } else {
        shoal_data::ctr::BadRows::Fail
    };
    let (data, schema, report) = shoal_data::ctr::read_click_log(&a.data, bad)?;
    let probs = p.predict(&data)?;
    let text: String = probs.iter().map(|p| format!("{p}\n")).collect();
    match &a.out {
        Some(o) => std::fs::write(o, text).with_context(|| format!("writing {}", o.display()))?,
        None => print!("{text}"),
    }
    if schema.label_col.is_some() {
        eprintln!(
            "{} rows: AUC {:.4}, logloss {:.4}{}",
            data.len(),
            shoal_data::metrics::auc(&probs, &data.labels).unwrap_or(f64::NAN),
            shoal_data::metrics::logloss(&probs, &data.labels),
            if report.skipped > 0 {
                format!(" ({} rows skipped)", report.skipped)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn gen_ctr(rows: usize, fields: usize, ids: u64, zipf: f64, seed: u64, out: PathBuf) -> Result<()> {
    if fields == 0 || ids == 0 || zipf <= 0.0 {
        bail!("--fields, --ids-per-field and --zipf must be positive");
    }
    let cfg = shoal_data::ctr::SynthConfig {
        rows,
        fields,
        ids_per_field: ids,
        zipf,
        seed,
        ..Default::default()
    };
    let probs = PathBuf::from(format!("{}.p", out.display()));
    let (n, auc) = shoal_data::ctr::write_synth(&cfg, &out, &probs)?;
    println!(
        "wrote {n} rows to {} and their planted probabilities to {}; the planted model's AUC on them is {auc:.4}",
        out.display(),
        probs.display()
    );
    Ok(())
}

fn translate(a: TranslateArgs) -> Result<()> {
    let t = Translator::load(&a.checkpoint)?;
    let stdin = std::io::stdin();
    let mut lines = Vec::new();
    for (i, l) in stdin.lock().lines().enumerate() {
        lines.push(l.with_context(|| format!("stdin line {}", i + 1))?);
    }
    let outs = t.translate(&lines, a.beam, a.alpha)?;
    let mut so = std::io::stdout().lock();
    for o in outs {
        writeln!(so, "{o}")?;
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let refs = shoal_data::read_lines(&a.reference)?;
    let hyps = match (&a.hyp, &a.checkpoint, &a.src) {
        (Some(h), None, None) => shoal_data::read_lines(h)?,
        (None, Some(c), Some(s)) => {
            let t = Translator::load(c)?;
            let src = shoal_data::read_lines(s)?;
            let outs = t.translate(&src, a.beam, a.alpha)?;
            if let Some(o) = &a.out {
                std::fs::write(o, outs.join("\n") + "\n")
                    .with_context(|| format!("writing {}", o.display()))?;
            }
            outs
        }
        _ => bail!("give either --hyp FILE, or --checkpoint DIR and --src FILE"),
    };
    let bleu = shoal_data::corpus_bleu(&hyps, &refs)
        .with_context(|| format!("scoring against {}", a.reference.display()))?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"bleu": bleu.score, "precisions": bleu.precisions, "bp": bleu.bp,
                "sys_len": bleu.sys_len, "ref_len": bleu.ref_len})
        );
    } else {
        println!("{bleu}");
    }
    Ok(())
}

fn bench(b: BenchCmd) -> Result<()> {
    match b {
        BenchCmd::NmtTrain {
            steps,
            warmup,
            dump_batches,
            data_dir,
            cell,
            layer_norm,
            unfused,
        } => {
            let opts = shoal_train::bench::NmtBenchOptions {
                data_dir,
                steps,
                warmup,
                dump_batches,
                cell: lib_value(cell)?,
                layer_norm,
                fused: !unfused,
                ..Default::default()
            };
            let r = shoal_train::bench::nmt_train(&opts, |l| eprintln!("{l}"))?;
            eprintln!(
                "shoal: {:.0} target tokens/s over {} steps ({:.1} s), loss {:.3} -> {:.3}, peak RSS {:.0} MiB",
                r.words_per_s, r.steps_timed, r.seconds, r.loss_first, r.loss_last, r.peak_rss_mb
            );
            println!("{}", serde_json::to_string(&r)?);
        }
        BenchCmd::Allreduce {
            transport,
            ranks,
            sizes,
            iters,
            processes,
            rank,
            job,
        } => {
            use shoal_comm::bench::{allreduce_seconds, memcpy_bandwidth, Which};
            if let (Some(rank), Some(job)) = (rank, &job) {
                let bytes: usize = sizes.parse().context("--sizes: bytes expected")?;
                let secs =
                    shoal_comm::bench::shm_rank_allreduce_seconds(job, rank, ranks, bytes, iters)?;
                println!("{secs}");
                return Ok(());
            }
            if processes && transport != "shm" {
                bail!("--processes works with --transport shm only");
            }
            let which = match transport.as_str() {
                "local" => Which::Local,
                "shm" => Which::Shm,
                "tcp" => Which::Tcp,
                other => bail!("--transport {other}: expected local, shm or tcp"),
            };
            for mb in sizes.split(',') {
                let mb: f64 = mb
                    .trim()
                    .parse()
                    .with_context(|| format!("--sizes: '{mb}' is not a number"))?;
                let bytes = (mb * 1048576.0) as usize / 4 * 4;
                let secs = if processes {
                    shm_processes_seconds(ranks, bytes, iters)?
                } else {
                    allreduce_seconds(which, ranks, bytes, iters)?
                };
                let bus = 2.0 * (ranks as f64 - 1.0) / ranks as f64 * bytes as f64 / secs;
                let memcpy = memcpy_bandwidth(bytes.min(64 << 20));
                println!(
                    "{}",
                    serde_json::json!({"transport": transport, "ranks": ranks, "bytes": bytes,
                        "processes": processes,
                        "seconds": secs, "bus_gbps": bus / 1e9, "memcpy_gbps": memcpy / 1e9})
                );
            }
        }
        BenchCmd::Transport { sizes, iters } => {
            use shoal_comm::bench::{push_pull_seconds, Which};
            for mb in sizes.split(',') {
                let mb: f64 = mb
                    .trim()
                    .parse()
                    .with_context(|| format!("--sizes: '{mb}' is not a number"))?;
                let bytes = (mb * 1048576.0) as usize;
                let shm = push_pull_seconds(Which::Shm, bytes, iters)?;
                let tcp = push_pull_seconds(Which::Tcp, bytes, iters)?;
                let grpc = shoal_control::bench::grpc_push_pull_seconds(bytes, iters)?;
                let gbs = |t: f64| 2.0 * bytes as f64 / t / 1e9;
                println!(
                    "{}",
                    serde_json::json!({"bytes": bytes, "shm_s": shm, "tcp_s": tcp, "grpc_s": grpc,
                        "shm_gbps": gbs(shm), "tcp_gbps": gbs(tcp), "grpc_gbps": gbs(grpc)})
                );
            }
        }
        BenchCmd::CtrScale {
            rows,
            dim,
            rule,
            ps_keys,
            ps_steps,
        } => {
            let r = shoal_train::bench::ctr_scale(rows, dim, sparse_rule(rule), ps_keys, ps_steps)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        BenchCmd::PsShards {
            sizes,
            workers,
            iters,
        } => {
            for mb in sizes.split(',') {
                let mb: f64 = mb
                    .trim()
                    .parse()
                    .with_context(|| format!("--sizes: '{mb}' is not a number"))?;
                let bytes = (mb * 1048576.0) as usize / 4 * 4;
                for shards in [1usize, 2] {
                    let t = shoal_comm::bench::ps_step_seconds(shards, workers, bytes, iters)?;
                    println!(
                        "{}",
                        serde_json::json!({"bytes": bytes, "shards": shards, "workers": workers,
                            "step_s": t, "gbps": 2.0 * (workers * bytes) as f64 / t / 1e9})
                    );
                }
            }
        }
        BenchCmd::RnnLayer {
            cell,
            batch,
            hidden,
            input,
            len,
            iters,
            warmup,
            unfused,
        } => {
            let o = shoal_train::bench::RnnLayerOptions {
                cell: lib_value(cell)?,
                batch,
                hidden,
                input: input.unwrap_or(hidden),
                len,
                iters,
                warmup,
                fused: !unfused,
            };
            let r = shoal_train::bench::rnn_layer(&o)?;
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
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

fn launch(a: LaunchArgs) -> Result<()> {
    use shoal_launch::{JobSpec, Overrides, Scheduler};
    if let Some(action) = a.action {
        return launch_action(action);
    }
    let Some(path) = a.k8s else {
        bail!("give a job spec (--k8s job.toml), or one of: status, logs, delete");
    };
    let ov = Overrides {
        name: a.name,
        namespace: a.namespace,
        scheduler: a.scheduler.as_deref().map(Scheduler::parse).transpose()?,
        image: a.image,
        workers: a.workers,
        ps: a.ps,
        gpus_per_worker: a.gpus_per_worker,
    };
    let spec = JobSpec::load(&path, &ov)?;
    // The training configuration the pods get: its [dist] section from the spec, the
    // data plane over TCP (pods share no memory).
    let (config, dist) = shoal_train::cluster::job_config(&spec.kind, &spec.config, |d| {
        d.workers = spec.workers as usize;
        d.ps = spec.ps as usize;
        if d.ps > 0 && d.mode == DistMode::Allreduce {
            d.mode = DistMode::PsSync;
        }
        if d.ps == 0 {
            d.mode = DistMode::Allreduce;
        }
        d.transport = shoal_train::config::DataPlane::Tcp;
    })
    .with_context(|| format!("the training configuration {}", spec.config.display()))?;
    let token = shoal_launch::manifest::new_token()?;
    let objects = shoal_launch::objects(&shoal_launch::Plan {
        spec: &spec,
        config_toml: &config,
        ps_pods: dist.separate_servers(),
        token: &token,
    });
    if !a.apply {
        print!("{}", shoal_launch::yaml::documents(&objects));
        return Ok(());
    }
    submit(&spec, &objects)
}

#[cfg(feature = "k8s")]
fn submit(spec: &shoal_launch::JobSpec, objects: &[serde_json::Value]) -> Result<()> {
    let c = shoal_launch::kube_api::Cluster::connect()?;
    for what in c.apply(objects)? {
        eprintln!("applied {what}");
    }
    eprintln!(
        "job {} submitted to namespace {}; follow it with `shoal launch status {} --namespace {}`",
        spec.name, spec.namespace, spec.name, spec.namespace
    );
    Ok(())
}

#[cfg(not(feature = "k8s"))]
fn submit(_: &shoal_launch::JobSpec, _: &[serde_json::Value]) -> Result<()> {
    bail!(
        "this shoal was built without the Kubernetes client: rebuild with `cargo build --release --features k8s`, or pipe `shoal launch --k8s JOB.toml` into `kubectl apply -f -`"
    )
}

#[cfg(feature = "k8s")]
fn launch_action(action: LaunchAction) -> Result<()> {
    let c = shoal_launch::kube_api::Cluster::connect()?;
    match action {
        LaunchAction::Status(j) => print!("{}", c.status(&j.namespace, &j.job)?.render()),
        LaunchAction::Logs { job, tail } => print!("{}", c.logs(&job.namespace, &job.job, tail)?),
        LaunchAction::Delete(j) => {
            let gone = c.delete(&j.namespace, &j.job)?;
            if gone.is_empty() {
                eprintln!("no objects of job {} in namespace {}", j.job, j.namespace);
            }
            for g in gone {
                eprintln!("deleted {g}");
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "k8s"))]
fn launch_action(action: LaunchAction) -> Result<()> {
    let (LaunchAction::Status(j) | LaunchAction::Logs { job: j, .. } | LaunchAction::Delete(j)) =
        action;
    bail!(
        "this shoal was built without the Kubernetes client (rebuild with `--features k8s`); meanwhile: kubectl -n {} get jobs,pods -l shoal.dev/job={}",
        j.namespace,
        j.job
    )
}

/// Widths like "32,32/64,64" (blocks) or "512,512".
fn widths(s: &str, flag: &str) -> Result<Vec<usize>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("{flag} '{s}': expected widths like 64,64"))
}

/// Seconds per shared-memory allreduce of `bytes` with each of `ranks` ranks a process
/// (this program, `bench allreduce --rank R --job J`): the slowest rank's time.
fn shm_processes_seconds(ranks: usize, bytes: usize, iters: usize) -> Result<f64> {
    let exe = std::env::current_exe().context("finding this program's path")?;
    let job = format!("bench-{}-{}", std::process::id(), bytes);
    let children = (0..ranks)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(["bench", "allreduce", "--ranks", &ranks.to_string()])
                .args(["--sizes", &bytes.to_string(), "--iters", &iters.to_string()])
                .args(["--rank", &r.to_string(), "--job", &job])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("starting benchmark rank {r}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut worst = 0.0f64;
    for (r, c) in children.into_iter().enumerate() {
        let out = c
            .wait_with_output()
            .with_context(|| format!("waiting for rank {r}"))?;
        if !out.status.success() {
            bail!("benchmark rank {r} failed ({})", out.status);
        }
        let secs: f64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("rank {r} printed no time"))?;
        worst = worst.max(secs);
    }
    Ok(worst)
}

fn train_cnn(a: CnnArgs) -> Result<()> {
    use shoal_train::cnn::{CnnTrainConfig, CnnTrainer};
    let blocks = a
        .blocks
        .split('/')
        .map(|b| widths(b, "--blocks"))
        .collect::<Result<Vec<_>>>()?;
    let cfg = CnnTrainConfig {
        model: shoal_model::cnn::CnnConfig {
            blocks,
            fc: widths(&a.fc, "--fc")?,
            dropout: a.dropout,
            batch_norm: !a.no_batch_norm,
            ..Default::default()
        },
        data_dir: a.data_dir.clone(),
        train_limit: a.train_limit,
        test_limit: a.test_limit,
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch_size: a.batch_size,
        lr: a.lr,
        seed: a.seed,
    };
    let mut t = CnnTrainer::new(cfg)?;
    let mut progress = shoal_train::progress::CnnProgress::new(a.epochs);
    let started = std::time::Instant::now();
    let eval = t.run(|e| progress.on_event(e));
    progress.finish();
    let eval = eval?;
    let seconds = started.elapsed().as_secs_f64();
    t.model.save(&a.out)?;
    println!(
        "test top-1 {:.2}%, top-5 {:.2}% after {} steps ({seconds:.0} s); model saved to {}",
        eval.top1 * 100.0,
        eval.top5 * 100.0,
        t.step,
        a.out.display()
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({"top1": eval.top1, "top5": eval.top5, "loss": eval.loss,
                "steps": t.step, "seconds": seconds, "params": t.model.net.len(),
                "images_per_s": (t.step as f64 * a.batch_size as f64) / seconds.max(1e-9),
                "checkpoint": a.out})
        );
    }
    Ok(())
}

fn compress(a: CompressArgs) -> Result<()> {
    use shoal_train::cnn::{evaluate, load_data, CnnModel};
    use shoal_train::compress::{self as cz, CompressSpec, Quant};
    let model = if a.model.extension().is_some_and(|e| e == "onnx") {
        let mut m = shoal_train::cnn_onnx::import(&a.model)?;
        // Data for fine-tuning and scoring: Fashion-MNIST unless the model says otherwise.
        m.cfg.data_dir = shoal_data::images::FASHION_MNIST_DIR.into();
        m
    } else {
        CnnModel::load(&a.model)?
    };
    let mut dcfg = model.cfg.clone();
    if a.train_limit > 0 {
        dcfg.train_limit = a.train_limit;
    }
    if a.test_limit > 0 {
        dcfg.test_limit = a.test_limit;
    }
    let specs: Vec<CompressSpec> = match &a.schedule {
        Some(path) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Schedule {
                config: Vec<CompressSpec>,
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let s: Schedule =
                toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
            s.config
        }
        None => {
            if a.rate != 0.0 && matches!(a.quant.as_deref(), None | Some("int8")) {
                bail!("--rate applies to codebooks: give --quant BITS with it");
            }
            let quant = match a.quant.as_deref() {
                None => None,
                Some("int8") => Some(Quant::Int8),
                Some(b) => Some(Quant::Codebook {
                    bits: b.parse().with_context(|| {
                        format!("--quant '{b}': expected int8 or a number of bits (1-8)")
                    })?,
                    rate: a.rate,
                }),
            };
            vec![CompressSpec {
                svd_ratio: a.svd_ratio,
                svd_energy: a.svd_energy,
                prune_fc: a.prune_fc,
                prune_conv: a.prune_conv,
                prune_global: a.prune_global,
                quant,
                fine_tune_steps: a.fine_tune_steps,
                lr: a.lr,
            }]
        }
    };
    for (i, s) in specs.iter().enumerate() {
        s.validate()
            .with_context(|| format!("configuration {} ({})", i + 1, s.label()))?;
    }
    if (a.out.is_some() || a.onnx.is_some()) && specs.len() != 1 {
        bail!("--out and --onnx take one configuration; a schedule writes only its report");
    }
    let (train, test) = load_data(&dcfg)?;
    if a.sensitivity {
        let levels = [0.5, 0.7, 0.8, 0.9, 0.95];
        println!(
            "{:<16} {}",
            "tensor",
            levels.map(|l| format!("{:>7.0}%", l * 100.0)).join("")
        );
        for (name, accs) in cz::sensitivity(&model, &test, &levels)? {
            let cols: String = accs
                .iter()
                .map(|a| format!("{:>7.2}%", a * 100.0))
                .collect();
            println!("{name:<16} {cols}");
        }
        return Ok(());
    }
    let base = evaluate(&model.net, &model.params, &model.stats, &test)?;
    eprintln!(
        "dense model: test top-1 {:.2}%, top-5 {:.2}% on {} images",
        base.top1 * 100.0,
        base.top5 * 100.0,
        test.len()
    );
    let mut rows = Vec::new();
    let mut last_model = None;
    for s in &specs {
        eprintln!("compressing: {}", s.label());
        let mut last = std::time::Instant::now();
        let r = cz::run(
            &model,
            s,
            &train,
            &test,
            a.out.as_deref(),
            |stage, step, of, loss| {
                if last.elapsed().as_secs_f64() >= 5.0 {
                    last = std::time::Instant::now();
                    eprintln!("  {stage} fine-tuning {step}/{of}: loss {loss:.4}");
                }
            },
        )?;
        rows.push(r.0);
        last_model = Some(r.1);
    }
    println!(
        "{:<40} {:>7} {:>7} {:>10} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "configuration",
        "top-1",
        "top-5",
        "bytes",
        "ratio",
        "weights",
        "fc",
        "x b1",
        "x b64",
        "fc b1",
        "fc b64"
    );
    println!(
        "{:<40} {:>6.2}% {:>6.2}% {:>10} {:>6.2}x {:>7.2}x {:>7.2}x {:>7.2}x {:>7.2}x {:>7.2}x {:>7.2}x",
        "dense (baseline)",
        base.top1 * 100.0,
        base.top5 * 100.0,
        rows.first().map_or(0, |r| r.dense_bytes),
        1.0,
        1.0,
        1.0,
        1.0,
        1.0,
        1.0,
        1.0
    );
    for r in &rows {
        let l = &r.latency_ms;
        println!(
            "{:<40} {:>6.2}% {:>6.2}% {:>10} {:>6.2}x {:>7.2}x {:>7.2}x {:>7.2}x {:>7.2}x {:>7.2}x {:>7.2}x",
            r.label,
            r.top1 * 100.0,
            r.top5 * 100.0,
            r.bytes,
            r.ratio,
            r.weight_ratio,
            r.fc_ratio,
            l.speedup_b1(),
            l.speedup_b64(),
            l.fc_speedup_b1(),
            l.fc_speedup_b64()
        );
    }
    let report = serde_json::json!({
        "model": a.model,
        "test_images": test.len(),
        "dense": {"top1": base.top1, "top5": base.top5},
        "results": rows,
    });
    if let Some(p) = &a.report {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        let mut points = vec![(1.0, base.top1)];
        points.extend(rows.iter().map(|r| (r.ratio, r.top1)));
        std::fs::write(p, shoal_train::plot::accuracy_vs_ratio_png(&points))
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!(
            "plot written to {} (black: dense; then each configuration in order)",
            p.display()
        );
    }
    if let Some(o) = &a.out {
        eprintln!("compressed model written to {}", o.display());
    }
    if let (Some(path), Some(m)) = (&a.onnx, &last_model) {
        let int8 = specs[0].quant == Some(Quant::Int8);
        shoal_onnx::save(&shoal_train::cnn_onnx::export(m, int8)?, path)?;
        eprintln!("ONNX model written to {}", path.display());
    }
    if a.json {
        println!("{report}");
    }
    Ok(())
}

fn coordinator(a: CoordinatorArgs) -> Result<()> {
    use shoal_train::cluster::{ENV_RUN, ENV_TOKEN};
    let token =
        std::env::var(ENV_TOKEN).with_context(|| format!("the job token: set {ENV_TOKEN}"))?;
    let run_dir = match a.run_dir {
        Some(d) => d,
        None => PathBuf::from(
            std::env::var(ENV_RUN)
                .with_context(|| format!("the run directory: pass --run-dir or set {ENV_RUN}"))?,
        ),
    };
    if !(a.rendezvous_timeout_s.is_finite() && a.rendezvous_timeout_s > 0.0) {
        bail!("--rendezvous-timeout-s must be a positive number of seconds");
    }
    shoal_train::cluster::run_coordinator(
        &a.kind,
        &a.config,
        &run_dir,
        a.listen,
        &token,
        std::time::Duration::from_secs_f64(a.rendezvous_timeout_s),
    )?;
    Ok(())
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Train(_) | Cmd::Role | Cmd::Coordinator(_)) {
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
        Cmd::Train(TrainCmd::Nmt(a)) => train_nmt(a),
        Cmd::Train(TrainCmd::Ctr(a)) => train_ctr(a),
        Cmd::Train(TrainCmd::Cnn(a)) => train_cnn(a),
        Cmd::Predict(a) => predict(a),
        Cmd::Data(DataCmd::GenCtr {
            rows,
            fields,
            ids_per_field,
            zipf,
            seed,
            out,
        }) => gen_ctr(rows, fields, ids_per_field, zipf, seed, out),
        Cmd::Translate(a) => translate(a),
        Cmd::Eval(a) => eval(a),
        Cmd::Bench(b) => bench(b),
        Cmd::Role => shoal_train::cluster::run_role().map_err(Into::into),
        Cmd::Coordinator(a) => coordinator(a),
        Cmd::Launch(a) => launch(a),
        Cmd::Compress(a) => compress(a),
        Cmd::Plan(a) => plan(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}
