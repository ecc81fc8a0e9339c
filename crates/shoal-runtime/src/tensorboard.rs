//! TensorBoard event files: scalars by tag, step and wall time, in the TFRecord framing
//! (length, masked CRC32C of the length, the `Event` protobuf, masked CRC32C of it) that
//! TensorBoard reads, written without TensorFlow or a protobuf dependency.

use crate::error::io_err;
use crate::Result;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// How event files' names start (TensorBoard finds them by it).
pub const FILE_PREFIX: &str = "events.out.tfevents.";

/// An open event file (`DIR/events.out.tfevents.SECONDS.HOST.shoal`).
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
    event: Vec<u8>,
    record: Vec<u8>,
}

impl EventWriter {
    /// Creates a new event file in `dir` (made if missing), its first record the file
    /// version TensorBoard expects.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let now = wall_time();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic() && b != b'/'))
            .unwrap_or_else(|| "localhost".into());
        let mut n = 0;
        let path = loop {
            let p = dir.join(format!(
                "{FILE_PREFIX}{}.{host}.shoal{}",
                now as u64,
                if n == 0 {
                    String::new()
                } else {
                    format!(".{n}")
                }
            ));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let file = File::create(&path).map_err(io_err(&path))?;
        let mut w = Self {
            out: BufWriter::new(file),
            path,
            event: Vec::with_capacity(128),
            record: Vec::with_capacity(160),
        };
        w.event.clear();
        encode_header(&mut w.event, now, 0);
        field_bytes(&mut w.event, 3, b"brain.Event:2");
        w.write_record()?;
        w.flush()?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `value` under `tag` at `step`, now.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        self.scalar_at(tag, step, value, wall_time())
    }

    /// Records `value` under `tag` at `step` and `wall_time` (seconds since the epoch).
    pub fn scalar_at(&mut self, tag: &str, step: u64, value: f64, wall_time: f64) -> Result<()> {
        self.event.clear();
        encode_scalar(&mut self.event, tag, step, value as f32, wall_time);
        self.write_record()
    }

    /// Writes what is buffered (TensorBoard then sees it).
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(io_err(&self.path))
    }

    fn write_record(&mut self) -> Result<()> {
        self.record.clear();
        frame(&mut self.record, &self.event);
        self.out.write_all(&self.record).map_err(io_err(&self.path))
    }
}

/// An event file for a progress display: it records until its first error, which it
/// hands back once (training goes on without the events).
#[derive(Default)]
pub struct Recorder {
    w: Option<EventWriter>,
}

impl Recorder {
    pub fn new(w: EventWriter) -> Self {
        Self { w: Some(w) }
    }

    /// Records the finite `scalars` at `step` (and writes them out with `flush`); the
    /// error that stopped the recording, the one time it happens.
    pub fn record(&mut self, step: u64, scalars: &[(&str, f64)], flush: bool) -> Option<String> {
        let w = self.w.as_mut()?;
        let mut r = scalars
            .iter()
            .filter(|(_, v)| v.is_finite())
            .try_for_each(|(tag, v)| w.scalar(tag, step, *v));
        if flush {
            r = r.and_then(|()| w.flush());
        }
        let e = r.err()?;
        self.w = None;
        Some(format!("TensorBoard events no longer recorded: {e}"))
    }

    /// [`Recorder::record`], the error (once) said above `bar`.
    pub fn record_on(
        &mut self,
        bar: &crate::progress::StepBar,
        step: u64,
        scalars: &[(&str, f64)],
        flush: bool,
    ) {
        if let Some(e) = self.record(step, scalars, flush) {
            bar.say(&e);
        }
    }

    /// The event file, while it records.
    pub fn writer(&mut self) -> Option<&mut EventWriter> {
        self.w.as_mut()
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The TFRecord framing of `data` appended to `out`.
fn frame(out: &mut Vec<u8>, data: &[u8]) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

/// An `Event { wall_time, step, summary { value { tag, simple_value } } }`.
fn encode_scalar(out: &mut Vec<u8>, tag: &str, step: u64, value: f32, wall_time: f64) {
    encode_header(out, wall_time, step);
    // Summary.Value: tag = 1 (string), simple_value = 2 (float).
    let value_len = 1 + varint_len(tag.len() as u64) + tag.len() + 1 + 4;
    // Summary: value = 1 (repeated message).
    let summary_len = 1 + varint_len(value_len as u64) + value_len;
    out.push(5 << 3 | 2);
    varint(out, summary_len as u64);
    out.push(1 << 3 | 2);
    varint(out, value_len as u64);
    field_bytes(out, 1, tag.as_bytes());
    out.push(2 << 3 | 5);
    out.extend_from_slice(&value.to_le_bytes());
}

/// `wall_time = 1` (double) and, when non-zero, `step = 2` (int64).
fn encode_header(out: &mut Vec<u8>, wall_time: f64, step: u64) {
    out.push(1 << 3 | 1);
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step > 0 {
        out.push(2 << 3);
        varint(out, step);
    }
}

fn field_bytes(out: &mut Vec<u8>, field: u8, b: &[u8]) {
    out.push(field << 3 | 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// TFRecord's masked CRC32C.
fn masked_crc(b: &[u8]) -> u32 {
    let c = crc32c(b);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bytewise by a table.
pub fn crc32c(b: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !b.iter().fold(!0u32, |c, &x| {
        t[((c ^ x as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3720 (iSCSI) appendix B.4 and the common check value.
    #[test]
    fn crc32c_known_answers() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
    }

    /// The fixture's events, framed.
    fn fixture_bytes() -> Vec<u8> {
        let mut got = Vec::new();
        let mut e = Vec::new();
        encode_header(&mut e, 1_796_000_000.25, 0);
        field_bytes(&mut e, 3, b"brain.Event:2");
        frame(&mut got, &e);
        for (tag, step, value, wall) in FIXTURE {
            e.clear();
            encode_scalar(&mut e, tag, step, value, wall);
            frame(&mut got, &e);
        }
        got
    }

    /// The events of [`FIXTURE`], written again: byte for byte the file whose reading
    /// by TensorBoard's own loader (`fixtures/tensorboard/record.py`, tensorboard 2.21)
    /// is recorded beside it. `SHOAL_WRITE_FIXTURES=1` writes the file first (refused
    /// under CI); then run `record.py`.
    #[test]
    fn events_are_the_recorded_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard");
        let got = fixture_bytes();
        if std::env::var_os("SHOAL_WRITE_FIXTURES").is_some() {
            assert!(
                std::env::var_os("CI").is_none(),
                "fixtures are not written under CI"
            );
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("events.fixture"), &got).unwrap();
        }
        let want = std::fs::read(dir.join("events.fixture")).unwrap();
        assert!(got == want, "the event bytes differ from the recorded file");
        let read: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("tensorboard_read.json")).unwrap())
                .unwrap();
        let scalars = read["scalars"].as_array().unwrap();
        assert_eq!(scalars.len(), FIXTURE.len());
        for (r, (tag, step, value, wall)) in scalars.iter().zip(FIXTURE) {
            assert_eq!(r["tag"], tag);
            assert_eq!(r["step"], step);
            assert_eq!(r["value"].as_f64().unwrap() as f32, value);
            assert_eq!(r["wall_time"].as_f64().unwrap(), wall);
        }
        assert_eq!(read["file_version"], "brain.Event:2");
        assert_eq!(read["crc_checked"], true);
    }

    /// What the fixture holds (a tag with a slash, a step past one varint byte, a
    /// negative value, a long tag).
    pub(super) const FIXTURE: [(&str, u64, f32, f64); 5] = [
        ("train/loss", 1, 9.125, 1_796_000_001.5),
        ("train/loss", 300, 4.75, 1_796_000_002.0),
        ("train/lr", 300, 0.002, 1_796_000_002.0),
        ("valid/delta", 70_000, -0.5, 1_796_000_100.0),
        (
            "a/tag/long/enough/for/two/byte/lengths/of/its/string/and/of/the/messages/around/it/\
             0123456789012345678901234567890123456789012345678901234567890123456789",
            1 << 40,
            1e-6,
            1_796_000_200.0,
        ),
    ];
}
