//! Click logs for CTR models: Criteo- and Avazu-format CSV (and any CSV with a header
//! and a `label`/`click` column) read into fixed-width rows of 64-bit feature keys, one
//! per field (`hash(field, value)`: a key space not bounded by memory), and a synthetic
//! generator drawing Zipf-distributed ids from a planted factorization-machine model, so
//! that the best achievable AUC is known.

use crate::{Error, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// How a column is turned into a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// A count or measurement: bucketed (`floor(ln(v)^2)` above 2, the value itself
    /// below), then hashed; empty is its own "missing" key.
    Integer,
    /// An id: the text hashed as is; empty is its own "missing" key.
    Categorical,
}

/// The columns of a click log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    /// The label column (None: unlabelled rows to score).
    pub label_col: Option<usize>,
    /// Column index, name and kind of every field, in key order.
    pub fields: Vec<(usize, String, FieldKind)>,
    /// Columns in a row.
    pub columns: usize,
}

impl Schema {
    /// The schema of a header line: the label is the column named `label`, `click` or
    /// `y` (if any); an `id` column is ignored; columns named `I<digits>` are integers
    /// (Criteo), all others categorical (Avazu's `hour` included).
    pub fn from_header(header: &str) -> Self {
        let cols: Vec<&str> = header.trim_end_matches(['\r', '\n']).split(',').collect();
        let label_col = cols
            .iter()
            .position(|c| matches!(c.trim(), "label" | "click" | "y"));
        let fields = cols
            .iter()
            .enumerate()
            .filter(|(i, c)| Some(*i) != label_col && c.trim() != "id")
            .map(|(i, c)| {
                let c = c.trim();
                let int =
                    c.len() > 1 && c.starts_with('I') && c[1..].bytes().all(|b| b.is_ascii_digit());
                let kind = if int {
                    FieldKind::Integer
                } else {
                    FieldKind::Categorical
                };
                (i, c.to_string(), kind)
            })
            .collect();
        Self {
            label_col,
            fields,
            columns: cols.len(),
        }
    }
}

/// Rows of a click log: `fields` keys and a 0/1 label per example.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CtrData {
    pub fields: usize,
    pub labels: Vec<f32>,
    /// `labels.len() * fields` keys, row-major.
    pub keys: Vec<u64>,
}

impl CtrData {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The keys of example `i`.
    pub fn row(&self, i: usize) -> &[u64] {
        &self.keys[i * self.fields..(i + 1) * self.fields]
    }

    /// The examples at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Self {
        let mut out = Self {
            fields: self.fields,
            labels: Vec::with_capacity(idx.len()),
            keys: Vec::with_capacity(idx.len() * self.fields),
        };
        for &i in idx {
            out.labels.push(self.labels[i]);
            out.keys.extend_from_slice(self.row(i));
        }
        out
    }

    /// A seeded split: the last `fraction` of a shuffled order is held out. Returns
    /// (train, held-out) indices.
    pub fn split(&self, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        let mut order: Vec<usize> = (0..self.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for i in (1..order.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let held = ((self.len() as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
        let cut = self.len() - held.min(self.len());
        let valid = order.split_off(cut);
        (order, valid)
    }
}

/// What to do with a malformed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRows {
    /// Stop with an error naming the file and line.
    Fail,
    /// Skip it and count it.
    Skip,
}

/// What reading a file found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadReport {
    pub rows: usize,
    pub skipped: usize,
    /// The first skipped row's problem, with its line.
    pub first_problem: Option<String>,
}

/// The 64-bit key of `value` in field `field` (FNV-1a over a per-field salt and the
/// bytes, then a SplitMix64 finaliser): the same on every run and machine.
pub fn feature_key(field: usize, value: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (field as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &b in value {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(h)
}

pub use shoal_optim::hash::mix64;

/// The bucket of an integer feature (the Criteo competition's winning transform).
fn int_bucket(v: f64) -> i64 {
    if v > 2.0 {
        (v.ln() * v.ln()).floor() as i64
    } else {
        v.floor() as i64
    }
}

/// Parses one data line into `keys` (appended) and returns its label.
fn parse_row(line: &str, schema: &Schema, keys: &mut Vec<u64>) -> std::result::Result<f32, String> {
    let cols: Vec<&str> = line.trim_end_matches(['\r', '\n']).split(',').collect();
    if cols.len() != schema.columns {
        return Err(format!(
            "{} fields, the header has {}",
            cols.len(),
            schema.columns
        ));
    }
    let label = match schema.label_col.map(|c| cols[c].trim()) {
        None | Some("0") | Some("0.0") => 0.0,
        Some("1") | Some("1.0") => 1.0,
        Some(other) => return Err(format!("label '{other}' is not 0 or 1")),
    };
    let start = keys.len();
    for (f, (col, name, kind)) in schema.fields.iter().enumerate() {
        let v = cols[*col].trim();
        let key = match (kind, v.is_empty()) {
            (_, true) => feature_key(f, b"\x00missing"),
            (FieldKind::Categorical, false) => feature_key(f, v.as_bytes()),
            (FieldKind::Integer, false) => {
                let x: f64 = v.parse().map_err(|_| {
                    keys.truncate(start);
                    format!("integer field {name} is '{v}', not a number")
                })?;
                feature_key(f, &int_bucket(x).to_le_bytes())
            }
        };
        keys.push(key);
    }
    Ok(label)
}

/// The error of reading line `line` of `path`: not UTF-8, or an I/O failure.
fn line_error(path: &Path, line: usize) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| match e.kind() {
        std::io::ErrorKind::InvalidData => Error::InvalidUtf8 {
            path: path.to_path_buf(),
            line,
        },
        _ => Error::Io {
            path: path.to_path_buf(),
            source: e,
        },
    }
}

/// A malformed row at `line`: an error naming it, or counted and skipped.
fn bad_row(
    bad: BadRows,
    path: &Path,
    line: usize,
    why: String,
    report: &mut ReadReport,
) -> Result<()> {
    match bad {
        BadRows::Fail => Err(Error::Ctr {
            path: path.to_path_buf(),
            line,
            why,
        }),
        BadRows::Skip => {
            report.skipped += 1;
            if report.first_problem.is_none() {
                report.first_problem = Some(format!("{}:{line}: {why}", path.display()));
            }
            Ok(())
        }
    }
}

/// Reads a click log in CSV with a header (see [`Schema::from_header`]); rows of a file
/// without a label column get label 0.
pub fn read_csv(path: &Path, bad: BadRows) -> Result<(CtrData, Schema, ReadReport)> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut lines = BufReader::new(file).lines();
    let header = match lines.next() {
        Some(h) => h.map_err(|_| Error::InvalidUtf8 {
            path: path.to_path_buf(),
            line: 1,
        })?,
        None => {
            return Err(Error::Ctr {
                path: path.to_path_buf(),
                line: 1,
                why: "empty file (expected a header line)".into(),
            })
        }
    };
    let schema = Schema::from_header(&header);
    if schema.fields.is_empty() {
        return Err(Error::Ctr {
            path: path.to_path_buf(),
            line: 1,
            why: "the header names no feature columns".into(),
        });
    }
    let mut data = CtrData {
        fields: schema.fields.len(),
        ..Default::default()
    };
    let mut report = ReadReport::default();
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        let line = line.map_err(line_error(path, n))?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_row(&line, &schema, &mut data.keys) {
            Ok(label) => data.labels.push(label),
            Err(why) => bad_row(bad, path, n, why, &mut report)?,
        }
    }
    report.rows = data.len();
    Ok((data, schema, report))
}

/// Settings of the synthetic click-log generator.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    pub rows: usize,
    pub fields: usize,
    /// Possible ids per field (up to 10^10 and beyond).
    pub ids_per_field: u64,
    /// Zipf exponent of id frequencies (about 1.05-1.2 in real logs).
    pub zipf: f64,
    /// Factor dimension of the planted FM.
    pub dim: usize,
    /// Scale of the planted first-order weights and factors.
    pub scale: f32,
    /// Intercept of the planted model (sets the click rate).
    pub bias: f32,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            rows: 100_000,
            fields: 20,
            ids_per_field: 1_000_000,
            zipf: 1.1,
            dim: 4,
            scale: 0.5,
            bias: -1.5,
            seed: 1,
        }
    }
}

/// A standard normal value from a key (Box-Muller on two hashes).
fn normal_of(key: u64, salt: u64) -> f32 {
    let a = mix64(key ^ salt.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let b = mix64(a ^ 0x5851_F42D_4C95_7F2D);
    let u1 = ((a >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = ((b >> 11) as f64) / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Draws a Zipf-like rank in `1..=n` (inverse transform of the continuous power law).
fn zipf_rank(u: f64, n: u64, s: f64) -> u64 {
    let n = n as f64;
    let r = if (s - 1.0).abs() < 1e-9 {
        n.powf(u)
    } else {
        let a = 1.0 - s;
        (u * (n.powf(a) - 1.0) + 1.0).powf(1.0 / a)
    };
    (r.floor() as u64).clamp(1, n as u64)
}

/// The planted model's click probability for one row of keys.
pub fn planted_probability(cfg: &SynthConfig, keys: &[u64]) -> f32 {
    let mut logit = cfg.bias;
    let d = cfg.dim;
    let mut sum = vec![0.0f32; d];
    let mut sq = 0.0f32;
    for &k in keys {
        logit += cfg.scale * normal_of(k, 1) / (keys.len() as f32).sqrt();
        for (j, s) in sum.iter_mut().enumerate() {
            let v = cfg.scale * normal_of(k, 100 + j as u64) / (keys.len() as f32).sqrt();
            *s += v;
            sq += v * v;
        }
    }
    let pair: f32 = 0.5 * (sum.iter().map(|s| s * s).sum::<f32>() - sq);
    logit += pair;
    1.0 / (1.0 + (-logit).exp())
}

/// Draws the rows one at a time: field `f`'s id is a Zipf rank mapped through a hash
/// (so the most frequent ids are spread over the id space), its key the one
/// [`read_csv`] derives from the id written in hex, and the label is drawn from the
/// planted model. `row` gets the label, ids, keys and planted probability.
fn draw_rows(cfg: &SynthConfig, mut row: impl FnMut(f32, &[u64], &[u64], f32)) {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let unit = |r: &mut ChaCha8Rng| ((r.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let mut ids = vec![0u64; cfg.fields];
    let mut keys = vec![0u64; cfg.fields];
    let mut hex = String::new();
    for _ in 0..cfg.rows {
        for f in 0..cfg.fields {
            let rank = zipf_rank(unit(&mut rng), cfg.ids_per_field, cfg.zipf);
            ids[f] = mix64(rank ^ ((f as u64) << 48)) % cfg.ids_per_field;
            hex.clear();
            use std::fmt::Write as _;
            let _ = write!(hex, "{:x}", ids[f]);
            keys[f] = feature_key(f, hex.as_bytes());
        }
        let p = planted_probability(cfg, &keys);
        let label = if unit(&mut rng) < p as f64 { 1.0 } else { 0.0 };
        row(label, &ids, &keys, p);
    }
}

/// Generates `cfg.rows` rows in memory (the keys [`read_csv`] would read from
/// [`write_synth`]'s file). Returns the data and each row's planted click probability.
pub fn generate(cfg: &SynthConfig) -> (CtrData, Vec<f32>) {
    let mut data = CtrData {
        fields: cfg.fields,
        labels: Vec::with_capacity(cfg.rows),
        keys: Vec::with_capacity(cfg.rows * cfg.fields),
    };
    let mut probs = Vec::with_capacity(cfg.rows);
    draw_rows(cfg, |label, _, keys, p| {
        data.labels.push(label);
        data.keys.extend_from_slice(keys);
        probs.push(p);
    });
    (data, probs)
}

/// Writes generated rows as CSV (`label,C1,...,CF`, each id in hex) to `path` and the
/// planted probabilities, one per line, to `probs_path`. Returns the row count and the
/// planted model's AUC on them (the best achievable).
pub fn write_synth(cfg: &SynthConfig, path: &Path, probs_path: &Path) -> Result<(usize, f64)> {
    let io = |p: &Path| {
        let p: PathBuf = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).map_err(io(path))?);
    let mut pw =
        std::io::BufWriter::new(std::fs::File::create(probs_path).map_err(io(probs_path))?);
    let header: Vec<String> = (1..=cfg.fields).map(|f| format!("C{f}")).collect();
    writeln!(w, "label,{}", header.join(",")).map_err(io(path))?;
    let (mut labels, mut probs) = (Vec::new(), Vec::new());
    let mut err = None;
    draw_rows(cfg, |label, ids, _, p| {
        if err.is_some() {
            return;
        }
        let mut line = format!("{}", label as u8);
        for id in ids {
            use std::fmt::Write as _;
            let _ = write!(line, ",{id:x}");
        }
        if let Err(e) = writeln!(w, "{line}").and_then(|()| writeln!(pw, "{p}")) {
            err = Some(e);
        }
        labels.push(label);
        probs.push(p);
    });
    if let Some(e) = err {
        return Err(io(path)(e));
    }
    w.flush().map_err(io(path))?;
    pw.flush().map_err(io(probs_path))?;
    let auc = crate::metrics::auc(&probs, &labels).unwrap_or(f64::NAN);
    Ok((labels.len(), auc))
}

/// Reads a click log in libffm format (`label field:feature:value ...`, fields numbered
/// from 0): each field's feature becomes `hash(field, feature)` (the value is ignored:
/// binary features, as in the Criteo libffm files), a field absent from a row its
/// "missing" key; the field count is the largest field number + 1.
pub fn read_libffm(path: &Path, bad: BadRows) -> Result<(CtrData, Schema, ReadReport)> {
    read_sparse_format(path, bad, false)
}

/// Reads a click log in libsvm format (`label feature:value ...`) with one feature per
/// field in field order, as in the libsvm versions of Criteo and Avazu: the feature at
/// position `f` of a row is field `f`'s, hashed as `hash(f, feature)` (values ignored,
/// as in libffm). Every row must have as many features as the first; one that has not
/// is a bad row.
pub fn read_libsvm(path: &Path, bad: BadRows) -> Result<(CtrData, Schema, ReadReport)> {
    read_sparse_format(path, bad, true)
}

/// libffm (`svm` false) or libsvm (`svm` true) rows.
fn read_sparse_format(
    path: &Path,
    bad: BadRows,
    svm: bool,
) -> Result<(CtrData, Schema, ReadReport)> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut rows: Vec<(f32, Vec<(usize, String)>)> = Vec::new();
    let mut report = ReadReport::default();
    let mut fields = 0usize;
    // libsvm: the feature count of the first good row, which every row must have.
    let mut width: Option<usize> = None;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(line_error(path, n))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = (|| -> std::result::Result<(f32, Vec<(usize, String)>), String> {
            let mut it = line.split_whitespace();
            let label = match it.next() {
                Some("0") | Some("-1") => 0.0,
                Some("1") | Some("+1") => 1.0,
                Some(other) => return Err(format!("label '{other}' is not 0/1 (or -1/+1)")),
                None => return Err("empty row".into()),
            };
            let mut feats = Vec::new();
            for (pos, tok) in it.enumerate() {
                if svm {
                    match tok.split_once(':') {
                        Some((x, v)) if !x.is_empty() && !v.contains(':') => {
                            feats.push((pos, x.to_string()))
                        }
                        _ => return Err(format!("'{tok}' is not feature:value")),
                    }
                    continue;
                }
                let mut p = tok.splitn(3, ':');
                let (f, x) = match (p.next(), p.next(), p.next()) {
                    (Some(f), Some(x), Some(_)) => (f, x),
                    _ => return Err(format!("'{tok}' is not field:feature:value")),
                };
                let f: usize =
                    f.parse().ok().filter(|f| *f < 4096).ok_or_else(|| {
                        format!("field '{f}' in '{tok}' is not a number below 4096")
                    })?;
                feats.push((f, x.to_string()));
            }
            if svm {
                match width {
                    Some(w) if w != feats.len() => {
                        return Err(format!(
                            "{} features, the first row has {w} (libsvm: one feature per field, in field order)",
                            feats.len()
                        ))
                    }
                    _ if feats.len() > 4096 => {
                        return Err(format!("{} features: at most 4096 fields", feats.len()))
                    }
                    _ => {}
                }
            }
            Ok((label, feats))
        })();
        match parsed {
            Ok(r) => {
                if svm {
                    width.get_or_insert(r.1.len());
                }
                fields = fields.max(r.1.iter().map(|(f, _)| f + 1).max().unwrap_or(0));
                rows.push(r);
            }
            Err(why) => bad_row(bad, path, n, why, &mut report)?,
        }
    }
    if fields == 0 {
        return Err(Error::Ctr {
            path: path.to_path_buf(),
            line: 1,
            why: if svm {
                "no feature:value entries".into()
            } else {
                "no field:feature:value entries".into()
            },
        });
    }
    let mut data = CtrData {
        fields,
        labels: Vec::with_capacity(rows.len()),
        keys: Vec::with_capacity(rows.len() * fields),
    };
    for (label, feats) in rows {
        let start = data.keys.len();
        data.keys
            .extend((0..fields).map(|f| feature_key(f, b"\x00missing")));
        for (f, x) in feats {
            data.keys[start + f] = feature_key(f, x.as_bytes());
        }
        data.labels.push(label);
    }
    report.rows = data.len();
    let schema = Schema {
        label_col: Some(0),
        fields: (0..fields)
            .map(|f| (f, format!("field{f}"), FieldKind::Categorical))
            .collect(),
        columns: fields + 1,
    };
    Ok((data, schema, report))
}

/// Reads a click log in CSV with a header, libffm or libsvm format, told apart by the
/// file's first line (a comma-separated header, `label field:feature:value` or
/// `label feature:value` entries).
pub fn read_click_log(path: &Path, bad: BadRows) -> Result<(CtrData, Schema, ReadReport)> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut first = String::new();
    let _ = BufReader::new(file).read_line(&mut first);
    let colons = if first.contains(',') {
        0
    } else {
        first
            .split_whitespace()
            .nth(1)
            .map_or(0, |t| t.matches(':').count())
    };
    match colons {
        2 => read_libffm(path, bad),
        1 => read_libsvm(path, bad),
        _ => read_csv(path, bad),
    }
}
