//! `shoal info` for NMT: a run directory (its checkpoints, the latest described) or one
//! checkpoint: the model, the data, how far training went, its losses and scores, and
//! the commands that use it.

use crate::checkpoint::Checkpoint;
use crate::config::NmtTrainConfig;
use crate::{Error, Result};
use shoal_data::SubwordTokenizer;
use shoal_runtime::info::{config_name as name, read_metrics, Info};
use shoal_runtime::store::{LATEST, META_FILE};
use std::path::Path;

/// The description of `path` when it is an NMT run or checkpoint; `None` when it is
/// something else (no `latest`, or a `meta.json` of another kind).
pub fn describe(path: &Path) -> Result<Option<Info>> {
    if path.join(LATEST).is_file() && !path.join(META_FILE).is_file() {
        let ckpt = shoal_runtime::store::resolve(path)?;
        let Some(mut info) = describe_checkpoint(&ckpt)? else {
            return Ok(None);
        };
        let mut kept: Vec<String> = std::fs::read_dir(path)
            .map_err(shoal_runtime::io_err(path))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ckpt-") && !n.ends_with(".tmp"))
            .collect();
        kept.sort();
        info.path = path.to_path_buf();
        info.kind = "nmt-run";
        info.what = "an NMT training run (from `shoal train nmt`)".into();
        let latest = ckpt
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut head = vec![
            ("checkpoints".to_string(), kept.join(", ")),
            ("latest".to_string(), latest),
        ];
        if let Some(b) = shoal_runtime::store::best(path) {
            let bleu = read_metrics(&b)?.get("bleu").copied();
            head.push((
                "best".to_string(),
                format!(
                    "{}{} (`{}/best`)",
                    b.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    bleu.map(|x| format!(", validation BLEU {x:.2}"))
                        .unwrap_or_default(),
                    path.display()
                ),
            ));
        }
        if path.join("job").is_dir() {
            head.push((
                "processes' logs".to_string(),
                path.join("job/logs").display().to_string(),
            ));
        }
        head.append(&mut info.made);
        info.made = head;
        for u in &mut info.usage {
            *u = u.replace(&ckpt.display().to_string(), &path.display().to_string());
        }
        return Ok(Some(info));
    }
    describe_checkpoint(path)
}

/// The description of one checkpoint directory (`None`: not an NMT checkpoint).
fn describe_checkpoint(dir: &Path) -> Result<Option<Info>> {
    let Ok(meta) = std::fs::read(dir.join(META_FILE)) else {
        return Ok(None);
    };
    let kind = serde_json::from_slice::<serde_json::Value>(&meta)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(String::from));
    if kind.as_deref() != Some("nmt") {
        return Ok(None);
    }
    let c = Checkpoint::load(dir)?;
    let m = &c.meta;
    let fail = |why: String| Error::Checkpoint {
        path: dir.to_path_buf(),
        why,
    };
    let cfg: NmtTrainConfig =
        toml::from_str(&m.config_toml).map_err(|e| fail(format!("its configuration: {e}")))?;
    let vocab = |json: &str, side: &str| {
        SubwordTokenizer::from_json(json)
            .map(|t| t.vocab_size())
            .map_err(|e| fail(format!("{side} tokenizer: {e}")))
    };
    let (src_vocab, tgt_vocab) = (
        vocab(&m.src_tokenizer, "source")?,
        vocab(&m.tgt_tokenizer, "target")?,
    );
    let params: usize = m
        .params
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let mut i = Info::new(
        dir,
        "nmt-checkpoint",
        "an NMT checkpoint (from `shoal train nmt`)",
    );
    let md = &cfg.model;
    i.made(
        "model",
        format!(
            "{}, {} layer{}, embed {}, hidden {}, attention {}{}{}, dropout {}; {params} parameters",
            name(&md.cell),
            md.layers,
            if md.layers == 1 { "" } else { "s" },
            md.embed,
            md.hidden,
            name(&md.attention),
            if md.layer_norm { ", layer norm" } else { "" },
            if md.tie_embeddings {
                ", tied embeddings"
            } else {
                ""
            },
            md.dropout
        ),
    );
    i.made(
        "vocabulary",
        format!("{src_vocab} source, {tgt_vocab} target subwords"),
    );
    i.made(
        "data",
        format!(
            "{} -> {}",
            cfg.data.train_src.display(),
            cfg.data.train_tgt.display()
        ),
    );
    let t = &cfg.train;
    i.made(
        "recipe",
        format!(
            "{} lr {} ({} schedule, {} warm-up steps), batch {} x {} worker(s), {} epochs, seed {}",
            name(&t.optimizer),
            t.lr,
            name(&t.schedule),
            t.warmup_steps,
            t.batch_size,
            cfg.dist.workers,
            t.epochs,
            t.seed
        ),
    );
    if cfg.dist.workers > 1 {
        i.made(
            "distributed",
            format!(
                "{} workers, mode {}{}",
                cfg.dist.workers,
                name(&cfg.dist.mode),
                if cfg.dist.ps > 0 {
                    format!(", {} parameter-server shards", cfg.dist.ps)
                } else {
                    String::new()
                }
            ),
        );
    }
    i.made(
        "trained",
        format!(
            "{} updates (epoch {}, batch {}) in {}",
            m.step,
            m.epoch + 1,
            m.batch,
            shoal_runtime::progress::clock(std::time::Duration::from_secs_f64(
                m.train_seconds.max(0.0)
            ))
        ),
    );
    let tail = &m.losses[m.losses.len().saturating_sub(100)..];
    if !tail.is_empty() {
        let mean = tail.iter().map(|&l| l as f64).sum::<f64>() / tail.len() as f64;
        i.metrics.insert("train_loss".into(), mean);
        i.made(
            "train_loss",
            format!("mean of the last {} updates' losses", tail.len()),
        );
    }
    i.metrics.extend(read_metrics(dir)?);
    let d = dir.display();
    i.usage = vec![
        format!("shoal translate --checkpoint {d} < source.txt"),
        format!("shoal eval --checkpoint {d} --src val.en --ref val.de"),
        format!("shoal train nmt --resume {d} --epochs N"),
    ];
    Ok(Some(i))
}
