//! NMT checkpoints: a directory holding `model.safetensors` (parameters by name),
//! `optimizer.safetensors` (optimizer state as flat buffers) and `meta.json` (format
//! version, configuration, tokenizers, step, data position, seeds, a CRC32 of each
//! tensor file and one of the metadata itself). Written atomically: everything goes to `NAME.tmp/`, each file and the
//! directory are fsync'ed, the directory is renamed into place, and only then does the
//! run's `latest` pointer move (itself written to a temp file and renamed).

use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use shoal_runtime::store::{bytes_f32, first_non_finite, serialize_tensors, write_dir_atomically};
pub use shoal_runtime::store::{publish, resolve, step_dir};

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Resolves `path` as [`resolve`] does and loads the checkpoint. Given a run directory,
/// a checkpoint that fails to load (damaged: a checksum, a truncated file) is passed
/// over, with a warning naming it and why, for the next newest complete one; a
/// checkpoint named directly is loaded or refused as it is.
pub fn load_resolved(path: &Path) -> Result<(PathBuf, Checkpoint)> {
    let dir = resolve(path)?;
    let first = match Checkpoint::load(&dir) {
        Ok(c) => return Ok((dir, c)),
        Err(e) => e,
    };
    let is_run = !path.join(shoal_runtime::store::META_FILE).is_file() && path.is_dir();
    if is_run {
        for older in shoal_runtime::store::candidates(path)? {
            if older == dir {
                continue;
            }
            if let Ok(c) = Checkpoint::load(&older) {
                eprintln!(
                    "shoal: {} does not load ({first}); using {}",
                    dir.display(),
                    older.display()
                );
                return Ok((older, c));
            }
        }
    }
    Err(first)
}

/// Checkpoint format version written in `meta.json`.
pub const FORMAT_VERSION: u32 = 1;

const MODEL_FILE: &str = "model.safetensors";
const OPTIM_FILE: &str = "optimizer.safetensors";
const META_FILE: &str = "meta.json";

/// Everything but the tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub format_version: u32,
    /// Which model family ("nmt").
    pub kind: String,
    /// The full configuration as TOML text.
    pub config_toml: String,
    pub src_tokenizer: String,
    pub tgt_tokenizer: String,
    /// Updates applied so far.
    pub step: u64,
    /// Data position: the next batch is batch `batch` of epoch `epoch`'s plan.
    pub epoch: u64,
    pub batch: u64,
    /// Optimizer step counter (for bias correction).
    pub optimizer_steps: u64,
    /// Seconds of training so far (for `max_minutes` across resumes).
    pub train_seconds: f64,
    /// Loss of each update so far, in order (the loss curve).
    pub losses: Vec<f32>,
    /// Parameter names and shapes in flat-buffer order.
    pub params: Vec<(String, Vec<usize>)>,
    /// CRC32 of each tensor file, by file name.
    pub crc32: BTreeMap<String, u32>,
    /// CRC32 of this metadata itself: of the file's bytes as written without this
    /// field, its last (checkpoints written before it load unchecked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_crc32: Option<u32>,
}

impl Meta {
    /// The CRC32 of its compact JSON without [`Meta::meta_crc32`]: what checkpoints of
    /// the first version of the field hold. Unreliable: JSON's numbers do not always
    /// read back as the same floats, so a sound file can fail it; a second chance only.
    fn reserialized_crc(&self) -> u32 {
        let mut m = self.clone();
        m.meta_crc32 = None;
        crc32fast::hash(&serde_json::to_vec(&m).unwrap_or_default())
    }
}

/// How `meta.json` ends when it carries its own CRC32 (the field comes last).
const CRC_FIELD: &[u8] = b",\n  \"meta_crc32\": ";

/// The bytes `meta.json` had before its CRC32 field was added (see [`Checkpoint::save`]),
/// if it has one in the place the writer puts it.
fn without_crc_field(bytes: &[u8]) -> Option<Vec<u8>> {
    let at = bytes
        .windows(CRC_FIELD.len())
        .rposition(|w| w == CRC_FIELD)?;
    let tail = &bytes[at + CRC_FIELD.len()..];
    let digits = tail.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || tail[digits..].trim_ascii() != b"}" {
        return None;
    }
    let mut out = bytes[..at].to_vec();
    out.extend_from_slice(b"\n}");
    Some(out)
}

/// A checkpoint in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub meta: Meta,
    /// Flat parameters, in `meta.params` order.
    pub params: Vec<f32>,
    /// Optimizer state buffers by name, each as long as `params`.
    pub optimizer: Vec<(String, Vec<f32>)>,
}

impl Checkpoint {
    /// Writes the checkpoint as directory `dir` atomically (see the module docs).
    /// An existing directory of that name is replaced.
    pub fn save(&mut self, dir: &Path) -> Result<()> {
        let mut named = Vec::with_capacity(self.meta.params.len());
        let mut offset = 0;
        for (pname, shape) in &self.meta.params {
            let len: usize = shape.iter().product();
            let slice = self
                .params
                .get(offset..offset + len)
                .ok_or_else(|| Error::Checkpoint {
                    path: dir.to_path_buf(),
                    why: format!("parameter buffer too short for '{pname}'"),
                })?;
            named.push((pname.clone(), shape.clone(), slice));
            offset += len;
        }
        let model = serialize_tensors(&named, &dir.join(MODEL_FILE))?;
        let optim_named: Vec<(String, Vec<usize>, &[f32])> = self
            .optimizer
            .iter()
            .map(|(n, d)| (n.clone(), vec![d.len()], d.as_slice()))
            .collect();
        let optim = serialize_tensors(&optim_named, &dir.join(OPTIM_FILE))?;
        self.meta.crc32 = BTreeMap::from([
            (MODEL_FILE.to_string(), crc32fast::hash(&model)),
            (OPTIM_FILE.to_string(), crc32fast::hash(&optim)),
        ]);
        // The CRC32 covers the bytes written without it; the field is added last, so the
        // reader recovers those bytes exactly (no float read back and written again).
        self.meta.meta_crc32 = None;
        let json_err = |e: serde_json::Error| Error::Checkpoint {
            path: dir.to_path_buf(),
            why: e.to_string(),
        };
        let body = serde_json::to_vec_pretty(&self.meta).map_err(json_err)?;
        self.meta.meta_crc32 = Some(crc32fast::hash(&body));
        let meta = serde_json::to_vec_pretty(&self.meta).map_err(json_err)?;
        debug_assert_eq!(without_crc_field(&meta).as_deref(), Some(body.as_slice()));
        write_dir_atomically(
            dir,
            &[
                (MODEL_FILE, &model),
                (OPTIM_FILE, &optim),
                (META_FILE, &meta),
            ],
        )?;
        Ok(())
    }

    /// Loads and verifies a checkpoint directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let fail = |why: String| Error::Checkpoint {
            path: dir.to_path_buf(),
            why,
        };
        if !dir.is_dir() {
            return Err(fail("no such checkpoint directory".into()));
        }
        let meta_path = dir.join(META_FILE);
        let meta_bytes = fs::read(&meta_path).map_err(|e| fail(format!("{META_FILE}: {e}")))?;
        let meta: Meta = serde_json::from_slice(&meta_bytes)
            .map_err(|e| fail(format!("{META_FILE} is not valid checkpoint metadata: {e}")))?;
        if meta.format_version != FORMAT_VERSION {
            return Err(fail(format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                meta.format_version
            )));
        }
        if let Some(want) = meta.meta_crc32 {
            let got = without_crc_field(&meta_bytes).map_or(0, |b| crc32fast::hash(&b));
            if got != want && meta.reserialized_crc() != want {
                return Err(fail(format!(
                    "{META_FILE} is corrupt (its contents' CRC32 is {got:08x}, it says {want:08x})"
                )));
            }
        }
        let read_checked = |file: &str| -> Result<Vec<u8>> {
            let bytes = fs::read(dir.join(file)).map_err(|e| fail(format!("{file}: {e}")))?;
            let want = meta
                .crc32
                .get(file)
                .ok_or_else(|| fail(format!("{META_FILE} has no checksum for {file}")))?;
            let got = crc32fast::hash(&bytes);
            if got != *want {
                return Err(fail(format!(
                    "{file} is corrupt or truncated ({} bytes, CRC32 {got:08x}, expected {want:08x})",
                    bytes.len()
                )));
            }
            Ok(bytes)
        };
        let model_bytes = read_checked(MODEL_FILE)?;
        let st = SafeTensors::deserialize(&model_bytes)
            .map_err(|e| fail(format!("{MODEL_FILE}: {e}")))?;
        let mut params = Vec::new();
        for (name, shape) in &meta.params {
            let t = st
                .tensor(name)
                .map_err(|_| fail(format!("{MODEL_FILE} has no tensor '{name}'")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape.as_slice() {
                return Err(fail(format!(
                    "tensor '{name}' is {:?} {:?}, expected F32 {:?}",
                    t.dtype(),
                    t.shape(),
                    shape
                )));
            }
            let at = params.len();
            params.extend(bytes_f32(t.data()));
            if let Some((i, v)) = first_non_finite(&params[at..]) {
                return Err(fail(format!(
                    "tensor '{name}' holds a value that is not finite ({v} at index {i})"
                )));
            }
        }
        let optim_bytes = read_checked(OPTIM_FILE)?;
        let st = SafeTensors::deserialize(&optim_bytes)
            .map_err(|e| fail(format!("{OPTIM_FILE}: {e}")))?;
        let mut optimizer = Vec::new();
        let mut names = st.names();
        names.sort();
        for name in names {
            let t = st
                .tensor(name)
                .map_err(|e| fail(format!("{OPTIM_FILE}: {e}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != [params.len()] {
                return Err(fail(format!(
                    "optimizer buffer '{name}' has shape {:?}, expected [{}]",
                    t.shape(),
                    params.len()
                )));
            }
            let values = bytes_f32(t.data());
            if let Some((i, v)) = first_non_finite(&values) {
                return Err(fail(format!(
                    "optimizer buffer '{name}' holds a value that is not finite ({v} at index {i})"
                )));
            }
            optimizer.push((name.to_string(), values));
        }
        Ok(Self {
            meta,
            params,
            optimizer,
        })
    }
}

/// Checkpoint averaging (as OpenNMT's `average_models.py` and fairseq's
/// `average_checkpoints.py`): the element-wise mean of the parameters of `dirs`
/// (summed in f64, in the order given), written as checkpoint `out`. The checkpoints
/// must hold the same model (parameter names and shapes, tokenizers); the result
/// carries the last one's metadata (step, data position, configuration) and optimizer
/// state, so it translates, scores and resumes like that one. Returns what was averaged.
pub fn average(dirs: &[std::path::PathBuf], out: &Path) -> Result<Checkpoint> {
    let fail = |path: &Path, why: String| Error::Checkpoint {
        path: path.to_path_buf(),
        why,
    };
    let mut sum: Vec<f64> = Vec::new();
    let mut first: Option<Checkpoint> = None;
    let mut last: Option<Checkpoint> = None;
    for d in dirs {
        let c = Checkpoint::load(d)?;
        match &first {
            None => {
                sum = c.params.iter().map(|&x| x as f64).collect();
                first = Some(c.clone());
            }
            Some(f) => {
                if c.meta.params != f.meta.params {
                    return Err(fail(
                        d,
                        format!(
                            "holds another model than {} (parameter names or shapes differ)",
                            dirs[0].display()
                        ),
                    ));
                }
                if c.meta.src_tokenizer != f.meta.src_tokenizer
                    || c.meta.tgt_tokenizer != f.meta.tgt_tokenizer
                {
                    return Err(fail(
                        d,
                        format!("has other vocabularies than {}", dirs[0].display()),
                    ));
                }
                for (s, &x) in sum.iter_mut().zip(&c.params) {
                    *s += x as f64;
                }
            }
        }
        last = Some(c);
    }
    let Some(mut avg) = last else {
        return Err(Error::Config(
            "average: give at least one checkpoint".into(),
        ));
    };
    let n = dirs.len() as f64;
    avg.params = sum.iter().map(|&s| (s / n) as f32).collect();
    avg.save(out)?;
    Ok(avg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            meta: Meta {
                format_version: FORMAT_VERSION,
                kind: "nmt".into(),
                config_toml: String::new(),
                src_tokenizer: "{}".into(),
                tgt_tokenizer: "{}".into(),
                step: 7,
                epoch: 1,
                batch: 3,
                optimizer_steps: 7,
                train_seconds: 1.5,
                losses: vec![3.0, 2.5],
                params: vec![("a.weight".into(), vec![2, 3]), ("a.bias".into(), vec![3])],
                crc32: BTreeMap::new(),
                meta_crc32: None,
            },
            params: (0..9).map(|i| i as f32 * 0.5).collect(),
            optimizer: vec![
                ("exp_avg".into(), vec![0.1; 9]),
                ("exp_avg_sq".into(), vec![0.2; 9]),
            ],
        }
    }

    #[test]
    fn round_trip_and_latest() {
        let run = tempfile::tempdir().unwrap();
        let mut c = sample();
        let d = step_dir(run.path(), 7);
        c.save(&d).unwrap();
        publish(run.path(), &d, 2).unwrap();
        let back = Checkpoint::load(&resolve(run.path()).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    /// The average of three checkpoints is their element-wise mean, saved and loaded
    /// back like any checkpoint, with the last one's position; another model is refused.
    #[test]
    fn average_is_the_mean_of_the_parameters() {
        let run = tempfile::tempdir().unwrap();
        let dirs: Vec<_> = (1..=3u64)
            .map(|s| {
                let mut c = sample();
                c.meta.step = s;
                c.params = (0..9).map(|i| (i as f32) * s as f32 + 0.25).collect();
                let d = step_dir(run.path(), s);
                c.save(&d).unwrap();
                d
            })
            .collect();
        let out = run.path().join("avg");
        let avg = average(&dirs, &out).unwrap();
        let back = Checkpoint::load(&out).unwrap();
        assert_eq!(back, avg);
        assert_eq!(back.meta.step, 3);
        // (i + 2i + 3i) / 3 + 0.25 = 2i + 0.25, exactly in f32.
        let want: Vec<f32> = (0..9).map(|i| 2.0 * i as f32 + 0.25).collect();
        assert_eq!(back.params, want);
        let mut other = sample();
        other.meta.params = vec![("b.weight".into(), vec![9])];
        let d = run.path().join("other");
        other.save(&d).unwrap();
        let e = average(&[dirs[0].clone(), d], &run.path().join("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("another model"), "{e}");
        assert!(!run.path().join("x").exists());
        assert!(average(&[], &run.path().join("y")).is_err());
    }

    #[test]
    fn keeps_only_the_newest() {
        let run = tempfile::tempdir().unwrap();
        for s in 1..=4 {
            let mut c = sample();
            let d = step_dir(run.path(), s);
            c.save(&d).unwrap();
            publish(run.path(), &d, 2).unwrap();
        }
        assert!(!step_dir(run.path(), 2).exists());
        assert!(step_dir(run.path(), 3).exists() && step_dir(run.path(), 4).exists());
        assert_eq!(resolve(run.path()).unwrap(), step_dir(run.path(), 4));
    }

    #[test]
    fn truncated_file_is_reported() {
        let run = tempfile::tempdir().unwrap();
        let d = step_dir(run.path(), 1);
        sample().save(&d).unwrap();
        let f = d.join(MODEL_FILE);
        let bytes = fs::read(&f).unwrap();
        fs::write(&f, &bytes[..bytes.len() - 5]).unwrap();
        let e = Checkpoint::load(&d).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("corrupt or truncated"),
            "{e}"
        );
    }

    #[test]
    fn flipped_byte_is_reported() {
        let run = tempfile::tempdir().unwrap();
        let d = step_dir(run.path(), 1);
        sample().save(&d).unwrap();
        let f = d.join(OPTIM_FILE);
        let mut bytes = fs::read(&f).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x40;
        fs::write(&f, &bytes).unwrap();
        let e = Checkpoint::load(&d).unwrap_err().to_string();
        assert!(e.contains("optimizer.safetensors"), "{e}");
    }

    #[test]
    fn garbage_meta_and_missing_dir_are_reported() {
        let run = tempfile::tempdir().unwrap();
        let d = step_dir(run.path(), 1);
        sample().save(&d).unwrap();
        fs::write(d.join(META_FILE), b"{ not json").unwrap();
        let e = Checkpoint::load(&d).unwrap_err().to_string();
        assert!(e.contains("meta.json"), "{e}");
        let e = resolve(&run.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }

    /// A run whose newest checkpoint is damaged (a flipped byte) or gone loads the next
    /// newest complete one; a damaged checkpoint named directly is still refused.
    #[test]
    fn a_damaged_or_missing_latest_falls_back_to_the_newest_good_one() {
        let run = tempfile::tempdir().unwrap();
        for s in 1..=3 {
            let mut c = sample();
            c.meta.step = s;
            let d = step_dir(run.path(), s);
            c.save(&d).unwrap();
            publish(run.path(), &d, 5).unwrap();
        }
        let f = step_dir(run.path(), 3).join(MODEL_FILE);
        let mut bytes = fs::read(&f).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0x01;
        fs::write(&f, &bytes).unwrap();
        let (dir, c) = load_resolved(run.path()).unwrap();
        assert_eq!((dir, c.meta.step), (step_dir(run.path(), 2), 2));
        assert!(load_resolved(&step_dir(run.path(), 3)).is_err());
        // 'latest' naming a checkpoint that is not there any more.
        fs::remove_dir_all(step_dir(run.path(), 3)).unwrap();
        assert_eq!(resolve(run.path()).unwrap(), step_dir(run.path(), 2));
        // Every checkpoint damaged: the newest one's error.
        for s in 1..=2 {
            fs::write(step_dir(run.path(), s).join(MODEL_FILE), b"x").unwrap();
        }
        let e = load_resolved(run.path()).unwrap_err().to_string();
        assert!(e.contains("ckpt-00000002"), "{e}");
    }

    /// A change to the metadata that still parses (a step number) is caught by its own
    /// checksum; metadata written before the checksum existed loads unchecked.
    #[test]
    fn edited_metadata_is_refused() {
        let run = tempfile::tempdir().unwrap();
        let d = step_dir(run.path(), 1);
        sample().save(&d).unwrap();
        let f = d.join(META_FILE);
        let text = fs::read_to_string(&f).unwrap();
        assert!(text.contains("\"step\": 7"), "{text}");
        fs::write(&f, text.replace("\"step\": 7", "\"step\": 8")).unwrap();
        let e = Checkpoint::load(&d).unwrap_err().to_string();
        assert!(e.contains("meta.json is corrupt"), "{e}");
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v.as_object_mut().unwrap().remove("meta_crc32");
        fs::write(&f, serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(Checkpoint::load(&d).unwrap().meta.step, 7);
    }

    /// JSON's numbers do not always read back as the floats written (serde_json's
    /// default parse is off by one unit in the last place now and then): the
    /// metadata's checksum covers the bytes, so such a checkpoint still loads, and
    /// saved again after loading it stays loadable (a resumed run's next checkpoint).
    #[test]
    fn metadata_whose_floats_do_not_read_back_exactly_still_loads() {
        let mut state = 1u64;
        let mut unit = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            (shoal_optim::hash::mix64(state) >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut seconds = Vec::new();
        let mut losses = Vec::new();
        for _ in 0..200_000 {
            let x: f64 = unit() * 1e4;
            let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            if back != x && seconds.len() < 3 {
                seconds.push(x);
            }
            let y = (unit() * 10.0) as f32;
            let back: f32 = serde_json::from_str(&serde_json::to_string(&y).unwrap()).unwrap();
            if back != y && losses.len() < 50 {
                losses.push(y);
            }
        }
        eprintln!(
            "of 200,000 draws, {}+ f64 and {}+ f32 did not read back exactly",
            seconds.len(),
            losses.len()
        );
        let run = tempfile::tempdir().unwrap();
        let mut c = sample();
        c.meta.train_seconds = seconds.first().copied().unwrap_or(1234.5678);
        c.meta.losses.extend(&losses);
        let d1 = step_dir(run.path(), 1);
        c.save(&d1).unwrap();
        let mut again = Checkpoint::load(&d1).unwrap();
        again.meta.step += 1;
        let d2 = step_dir(run.path(), 2);
        again.save(&d2).unwrap();
        assert_eq!(Checkpoint::load(&d2).unwrap().meta.step, 8);
    }

    #[test]
    fn interrupted_save_leaves_previous_latest() {
        let run = tempfile::tempdir().unwrap();
        let d1 = step_dir(run.path(), 1);
        sample().save(&d1).unwrap();
        publish(run.path(), &d1, 2).unwrap();
        // A crash in the middle of writing the next checkpoint leaves only a .tmp dir.
        let tmp = run.path().join("ckpt-00000002.tmp");
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join(MODEL_FILE), b"partial").unwrap();
        assert_eq!(resolve(run.path()).unwrap(), d1);
        Checkpoint::load(&resolve(run.path()).unwrap()).unwrap();
    }
}
