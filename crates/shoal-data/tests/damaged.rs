//! Every reader of this crate given damaged copies of valid files (bits flipped, cut,
//! spans deleted, inserted or repeated, numbers made extreme: `shoal_testkit::damaged`)
//! returns the rows it could read or an error; none panics. Seeds are fixed, so a
//! failure names an input that can be replayed.

use shoal_data::ctr::{read_click_log, BadRows};
use shoal_data::{load_parallel, EmptyLines, SubwordTokenizer};
use shoal_testkit::{damaged, never_panics};
use std::io::Write;
use std::path::Path;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data");

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn click_logs_of_every_format() {
    let d = tempfile::tempdir().unwrap();
    let criteo = std::fs::read(Path::new(DATA).join("ctr/criteo_sample.txt")).unwrap();
    let avazu = std::fs::read(Path::new(DATA).join("ctr/avazu_sample.txt")).unwrap();
    let libffm = b"1 0:12:1 1:7:1 2:99:0.5\n0 0:3:1 1:7:1 2:1:1\n1 0:12:1 1:8:1 2:5:1\n".to_vec();
    let libsvm = b"1 3:1 17:1 40:0.5\n0 4:1 18:1 41:1\n1 3:1 19:1 40:1\n".to_vec();
    let p = d.path().join("log");
    for (name, valid, seed) in [
        ("criteo CSV", &criteo, 1),
        ("avazu CSV", &avazu, 2),
        ("libffm", &libffm, 3),
        ("libsvm", &libsvm, 4),
    ] {
        let inputs = damaged(valid, seed, 150);
        for bad in [BadRows::Fail, BadRows::Skip] {
            never_panics(name, &inputs, |bytes| {
                write(&p, bytes);
                read_click_log(&p, bad).map(|r| r.0.len())
            });
        }
    }
}

#[test]
fn parallel_corpora() {
    let d = tempfile::tempdir().unwrap();
    let (src, tgt) = (d.path().join("s"), d.path().join("t"));
    let text = b"A man.\nTwo dogs run in the snow.\nA red car.\n".to_vec();
    write(&tgt, b"Ein Mann.\nZwei Hunde.\nEin Auto.\n");
    let inputs = damaged(&text, 5, 200);
    for empty in [EmptyLines::Error, EmptyLines::Skip] {
        never_panics("corpus", &inputs, |bytes| {
            write(&src, bytes);
            load_parallel(&src, &tgt, empty).map(|c| c.len())
        });
    }
}

#[test]
fn tokenizer_files() {
    let lines: Vec<String> = ["a man walks", "two dogs run", "a red car"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let json = SubwordTokenizer::train(&lines, 40)
        .unwrap()
        .to_json()
        .unwrap();
    let inputs = damaged(json.as_bytes(), 6, 200);
    never_panics("tokenizer JSON", &inputs, |bytes| {
        let s = String::from_utf8_lossy(bytes);
        SubwordTokenizer::from_json(&s).map(|t| t.vocab_size())
    });
}

#[test]
fn idx_image_files() {
    let d = tempfile::tempdir().unwrap();
    // Two 2x3 images and their labels, plain IDX.
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
    images.extend(0u8..12);
    let labels = vec![0, 0, 8, 1, 0, 0, 0, 2, 3, 7];
    let (ip, lp) = (d.path().join("i"), d.path().join("l"));
    write(&lp, &labels);
    let ok = |bytes: &[u8]| {
        write(&ip, bytes);
        shoal_data::images::read_idx_pair(&ip, &lp, 10).map(|s| s.len())
    };
    assert_eq!(ok(&images).unwrap(), 2, "the valid pair reads");
    never_panics("IDX images", &damaged(&images, 7, 200), ok);
    write(&ip, &images);
    let inputs = damaged(&labels, 8, 200);
    never_panics("IDX labels", &inputs, |bytes| {
        write(&lp, bytes);
        shoal_data::images::read_idx_pair(&ip, &lp, 10).map(|s| s.len())
    });
    // And gzip'd: a damaged stream.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&images).unwrap();
    let gz = gz.finish().unwrap();
    let gzp = d.path().join("i.gz");
    never_panics("gzip'd IDX", &damaged(&gz, 9, 150), |bytes| {
        write(&gzp, bytes);
        shoal_data::images::read_idx_pair(&gzp, &lp, 10).map(|s| s.len())
    });
}
