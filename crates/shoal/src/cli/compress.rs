//! `shoal compress`: a trained CNN compressed (one technique, a chain, or a schedule of
//! them), scored and reported.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct CompressArgs {
    /// The trained model: a `train cnn` output directory, a `.shoalz` written by
    /// `compress --out`, or an ONNX file (e.g. exported from PyTorch:
    /// Conv/BatchNormalization/Relu/MaxPool, then Gemm layers).
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Also write the (compressed) model as ONNX here (int8 as DequantizeLinear + int8
    /// weights; pruned and shared weights as their float values).
    #[arg(long)]
    pub(crate) onnx: Option<PathBuf>,
    /// Factorize the hidden fully-connected layers by SVD to this size ratio per layer.
    #[arg(long)]
    pub(crate) svd_ratio: Option<f64>,
    /// ... or at the rank keeping this share of the singular values' energy.
    #[arg(long)]
    pub(crate) svd_energy: Option<f64>,
    /// Fraction of fully-connected weights to prune (e.g. 0.9).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) prune_fc: f64,
    /// Fraction of convolution weights to prune.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) prune_conv: f64,
    /// One magnitude threshold over all weights (at --prune-fc) instead of per layer.
    #[arg(long)]
    pub(crate) prune_global: bool,
    /// int8 (per output channel), or a k-means codebook of this many bits (1-8).
    #[arg(long, value_name = "int8|BITS")]
    pub(crate) quant: Option<String>,
    /// Codebooks: entropy-constrained clustering at this rate (0: plain k-means; around
    /// 0.1 brings 2-bit codes to about 1.9 bits a weight after Huffman coding).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) rate: f32,
    /// Fine-tuning updates after each stage (pruning ramps its sparsity over them).
    #[arg(long, default_value_t = 0)]
    pub(crate) fine_tune_steps: u64,
    /// Fine-tuning learning rate (Adam).
    #[arg(long, default_value_t = 2e-4)]
    pub(crate) lr: f32,
    /// A TOML table of configurations (`[[config]]` with the fields above in snake_case,
    /// e.g. `quant = "int8"` or `quant = 4` with `rate = 0.1`; examples/cnn/schedule.toml)
    /// run one after the other into one report.
    #[arg(long, conflicts_with_all = ["svd_ratio", "svd_energy", "quant", "rate"])]
    pub(crate) schedule: Option<PathBuf>,
    /// Where the compressed model goes (one configuration).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Save the report as JSON here.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
    /// Plot top-1 against compression ratio to this PNG.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// Print accuracy vs sparsity for each weight tensor pruned alone, and stop.
    #[arg(long)]
    pub(crate) sensitivity: bool,
    /// Fine-tune on only the first N training images (0: the model's settings).
    #[arg(long, default_value_t = 0)]
    pub(crate) train_limit: usize,
    /// Score on only the first N test images (0: the model's settings).
    #[arg(long, default_value_t = 0)]
    pub(crate) test_limit: usize,
    /// Print the JSON report as the last line.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(a: CompressArgs) -> Result<()> {
    use shoal_cnn::compress::{self as cz, CompressSpec, Quant};
    use shoal_cnn::trainer::{evaluate, load_data, CnnModel};
    let model = if a.model.extension().is_some_and(|e| e == "onnx") {
        let mut m = shoal_cnn::onnx::import(&a.model)?;
        // Data for fine-tuning and scoring: Fashion-MNIST unless the model says otherwise.
        m.cfg.data_dir = shoal_data::images::FASHION_MNIST_DIR.into();
        m
    } else if a.model.is_file() {
        // A compressed file: the model it computes with (pruned zeros, quantized values
        // as their floats), compressed again or exported from there.
        let bytes =
            std::fs::read(&a.model).with_context(|| format!("reading {}", a.model.display()))?;
        let (m, spec) = cz::decode(&bytes, &a.model)?;
        eprintln!(
            "{}: a compressed model ({}); starting from the values it stores",
            a.model.display(),
            spec.label()
        );
        m
    } else {
        CnnModel::load(&a.model)
            .map_err(|e| crate::cli::info::as_kind(&a.model, "cnn", "a CNN model", e))?
    };
    let mut dcfg = model.cfg.clone();
    if a.train_limit > 0 {
        dcfg.train_limit = a.train_limit;
    }
    if a.test_limit > 0 {
        dcfg.test_limit = a.test_limit;
    }
    // Every file this run writes is checked before the work (a missing folder found
    // after minutes of fine-tuning threw the work away).
    for (flag, p) in [
        ("--out", &a.out),
        ("--onnx", &a.onnx),
        ("--report", &a.report),
        ("--plot", &a.plot),
    ] {
        if let Some(p) = p {
            writable_parent(flag, p)?;
        }
    }
    let specs: Vec<CompressSpec> = match &a.schedule {
        Some(path) => read_schedule(path)?,
        None => vec![spec(
            a.quant.as_deref(),
            a.rate,
            CompressSpec {
                svd_ratio: a.svd_ratio,
                svd_energy: a.svd_energy,
                prune_fc: a.prune_fc,
                prune_conv: a.prune_conv,
                prune_global: a.prune_global,
                quant: None,
                fine_tune_steps: a.fine_tune_steps,
                lr: a.lr,
            },
            "--quant",
        )?],
    };
    let technique = |s: &CompressSpec| {
        s.svd_ratio.is_some()
            || s.svd_energy.is_some()
            || s.prune_fc > 0.0
            || s.prune_conv > 0.0
            || s.quant.is_some()
    };
    if !a.sensitivity && a.onnx.is_none() && !specs.iter().any(technique) {
        bail!(
            "no compression technique given: --prune-fc, --prune-conv, --quant (int8 or bits), \
             --svd-ratio or --svd-energy (or --schedule FILE, --sensitivity, or --onnx to \
             export the model as it is)"
        );
    }
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
        let mut bar = shoal_runtime::progress::StepBar::new();
        bar.start((model.net.weights().len() * levels.len()) as u64);
        let table = cz::sensitivity_with(&model, &test, &levels, |n, total| {
            bar.step(
                n as u64,
                format!(
                    "pruned copies scored (of {total}, {} test images each)",
                    test.len()
                ),
            )
        })?;
        bar.finish();
        for (name, accs) in table {
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
    println!(
        "key: bytes = the file's size; ratio = dense bytes / these bytes; weights = the same \
         for weight bytes alone; fc = for the fully-connected layers' weights; x b1, x b64 = \
         speed-up of the whole network at batch 1 and 64 (dense time / this time); \
         fc b1, fc b64 = the same for the fully-connected layers alone"
    );
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
        use shoal_cnn::plot::Point;
        let mut points = vec![Point {
            label: "dense (baseline)",
            ratio: 1.0,
            top1: base.top1,
        }];
        points.extend(rows.iter().map(|r| Point {
            label: &r.label,
            ratio: r.ratio,
            top1: r.top1,
        }));
        std::fs::write(
            p,
            shoal_cnn::plot::accuracy_vs_ratio_png(&points, test.len()),
        )
        .with_context(|| format!("writing {}", p.display()))?;
        eprintln!(
            "plot written to {} (top-1 against compression ratio, one numbered marker per row of the table, named in its legend)",
            p.display()
        );
    }
    if let Some(o) = &a.out {
        eprintln!("compressed model written to {}", o.display());
    }
    if let (Some(path), Some(m)) = (&a.onnx, &last_model) {
        let int8 = specs[0].quant == Some(Quant::Int8);
        shoal_onnx::save(&shoal_cnn::onnx::export(m, int8)?, path)?;
        eprintln!("ONNX model written to {}", path.display());
    }
    if a.json {
        println!("{report}");
    }
    Ok(())
}

/// `path`'s folder exists (the file itself is written atomically at the end).
fn writable_parent(flag: &str, path: &std::path::Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "{flag} {}: the folder {} does not exist (nothing was done)",
            path.display(),
            parent.display()
        );
    }
    Ok(())
}

/// A configuration from the flags' spelling: `quant` is `int8` or a number of bits, and
/// `rate` goes with the bits (`what` names where the value came from, for errors).
fn spec(
    quant: Option<&str>,
    rate: f32,
    base: shoal_cnn::compress::CompressSpec,
    what: &str,
) -> Result<shoal_cnn::compress::CompressSpec> {
    use shoal_cnn::compress::Quant;
    if rate != 0.0 && matches!(quant, None | Some("int8")) {
        bail!("{what}: rate applies to codebooks: give a number of bits with it");
    }
    let quant = match quant {
        None => None,
        Some("int8") => Some(Quant::Int8),
        Some(b) => Some(Quant::Codebook {
            bits: b.parse().with_context(|| {
                format!("{what} '{b}': expected int8 or a number of bits (1-8)")
            })?,
            rate,
        }),
    };
    Ok(shoal_cnn::compress::CompressSpec { quant, ..base })
}

/// A `--schedule` file: `[[config]]` tables with the flags' fields in snake_case
/// (`prune_fc = 0.95`, `quant = "int8"` or `quant = 4`, `rate = 0.15`,
/// `fine_tune_steps = 1000`, ...); errors name the file, the table and the field.
fn read_schedule(path: &std::path::Path) -> Result<Vec<shoal_cnn::compress::CompressSpec>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Schedule {
        config: Vec<toml::Table>,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let s: Schedule = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let mut out = Vec::new();
    for (i, mut t) in s.config.into_iter().enumerate() {
        let at = format!("{}: [[config]] {}", path.display(), i + 1);
        let quant = match t.remove("quant") {
            None => None,
            Some(toml::Value::String(q)) => Some(q),
            Some(toml::Value::Integer(b)) => Some(b.to_string()),
            // The form the saved reports use: `quant = { kind = "codebook", bits = 4 }`.
            Some(toml::Value::Table(q)) => {
                let q: shoal_cnn::compress::Quant =
                    toml::Value::Table(q).try_into().map_err(|e| {
                        anyhow::anyhow!(
                            "{at}: quant: {e} (or write quant = \"int8\" / quant = BITS)"
                        )
                    })?;
                let base: shoal_cnn::compress::CompressSpec = toml::Value::Table(t)
                    .try_into()
                    .map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
                out.push(shoal_cnn::compress::CompressSpec {
                    quant: Some(q),
                    ..base
                });
                continue;
            }
            Some(v) => bail!("{at}: quant = {v}: expected \"int8\" or a number of bits (1-8)"),
        };
        let rate = match t.remove("rate") {
            None => 0.0,
            Some(toml::Value::Float(r)) => r as f32,
            Some(toml::Value::Integer(r)) => r as f32,
            Some(v) => bail!("{at}: rate = {v}: expected a number"),
        };
        let base: shoal_cnn::compress::CompressSpec = toml::Value::Table(t)
            .try_into()
            .map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        out.push(spec(quant.as_deref(), rate, base, &format!("{at}: quant"))?);
    }
    if out.is_empty() {
        bail!("{}: no [[config]] table", path.display());
    }
    Ok(out)
}
