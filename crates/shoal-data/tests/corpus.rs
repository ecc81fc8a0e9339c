//! Reading text files and parallel corpora, including every error case.

use std::path::{Path, PathBuf};

use shoal_data::{load_parallel, read_lines, EmptyLines, Error};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-file.en");
    let err = read_lines(&path).unwrap_err();
    match &err {
        Error::Io { path: p, source } => {
            assert_eq!(p, &path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(err.to_string().contains("no-such-file.en"), "{err}");
}

#[test]
fn invalid_utf8_gives_the_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.de",
        b"gut\nauch gut\nschlecht \xff\xfe\nok\n",
    );
    let err = read_lines(&path).unwrap_err();
    match &err {
        Error::InvalidUtf8 { path: p, line } => {
            assert_eq!(p, &path);
            assert_eq!(*line, 3);
        }
        other => panic!("expected InvalidUtf8, got {other:?}"),
    }
    assert!(err.to_string().contains("bad.de:3"), "{err}");
}

#[test]
fn line_endings_are_stripped() {
    let dir = tempfile::tempdir().unwrap();
    let crlf = write(dir.path(), "crlf", b"one\r\ntwo\r\n");
    assert_eq!(read_lines(&crlf).unwrap(), ["one", "two"]);
    let no_final = write(dir.path(), "nofinal", b"one\ntwo");
    assert_eq!(read_lines(&no_final).unwrap(), ["one", "two"]);
    let bom = write(dir.path(), "bom", "\u{feff}eins\nzwei\n".as_bytes());
    assert_eq!(read_lines(&bom).unwrap(), ["eins", "zwei"]);
    let empty = write(dir.path(), "empty", b"");
    assert!(read_lines(&empty).unwrap().is_empty());
    let blank = write(dir.path(), "blank", b"\n\nx\n");
    assert_eq!(read_lines(&blank).unwrap(), ["", "", "x"]);
}

#[test]
fn mismatched_line_counts_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "a.en", b"one\ntwo\nthree\n");
    let tgt = write(dir.path(), "a.de", b"eins\nzwei\n");
    let err = load_parallel(&src, &tgt, EmptyLines::Error).unwrap_err();
    match &err {
        Error::LineCountMismatch {
            src: s,
            src_lines,
            tgt: t,
            tgt_lines,
        } => {
            assert_eq!((s, *src_lines, t, *tgt_lines), (&src, 3, &tgt, 2));
        }
        other => panic!("expected LineCountMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("a.en") && msg.contains("a.de"), "{msg}");
}

#[test]
fn empty_line_is_an_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "b.en", b"one\ntwo\nthree\n");
    let tgt = write(dir.path(), "b.de", b"eins\n\ndrei\n");
    let err = load_parallel(&src, &tgt, EmptyLines::Error).unwrap_err();
    assert!(
        matches!(&err, Error::EmptyLine { path, line: 2 } if path == &tgt),
        "{err:?}"
    );

    // Whitespace-only counts as empty, and the source side is reported too.
    let src = write(dir.path(), "c.en", b"one\ntwo\n \t \n");
    let tgt = write(dir.path(), "c.de", b"eins\nzwei\ndrei\n");
    let err = load_parallel(&src, &tgt, EmptyLines::Error).unwrap_err();
    assert!(
        matches!(&err, Error::EmptyLine { path, line: 3 } if path == &src),
        "{err:?}"
    );
    assert!(err.to_string().contains("c.en:3"), "{err}");
}

#[test]
fn empty_lines_can_be_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "d.en", b"one\n\nthree\nfour\n  \n");
    let tgt = write(dir.path(), "d.de", b"eins\nzwei\n\nvier\nfuenf\n");
    let corpus = load_parallel(&src, &tgt, EmptyLines::Skip).unwrap();
    assert_eq!(corpus.src, ["one", "four"]);
    assert_eq!(corpus.tgt, ["eins", "vier"]);
    assert_eq!(corpus.skipped, 3);
    assert_eq!(corpus.len(), 2);
}

#[test]
fn loads_multi30k_validation_set() {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/multi30k");
    let corpus = load_parallel(
        &Path::new(data).join("val.en"),
        &Path::new(data).join("val.de"),
        EmptyLines::Error,
    )
    .unwrap();
    assert_eq!(corpus.len(), 1014);
    assert_eq!(corpus.skipped, 0);
    assert!(corpus
        .tgt
        .iter()
        .any(|s| s.contains('ü') || s.contains('ß')));
}
