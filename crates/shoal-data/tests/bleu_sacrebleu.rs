//! BLEU and 13a tokenisation checked against sacreBLEU's own output.
//!
//! Reference: `tests/fixtures/bleu_cases.json`, written by
//! `tests/fixtures/make_bleu_fixture.py` with the sacreBLEU version it records.

use serde::Deserialize;
use shoal_data::{corpus_bleu, tokenize_13a, Error};

#[derive(Deserialize)]
struct Fixture {
    sacrebleu_version: String,
    tokenize_13a: Vec<TokenizeCase>,
    corpora: Vec<CorpusCase>,
}

#[derive(Deserialize)]
struct TokenizeCase {
    input: String,
    output: String,
}

#[derive(Deserialize)]
struct CorpusCase {
    name: String,
    hyps: Vec<String>,
    refs: Vec<String>,
    score: f64,
    counts: [usize; 4],
    totals: [usize; 4],
    precisions: [f64; 4],
    bp: f64,
    ratio: f64,
    sys_len: usize,
    ref_len: usize,
    formatted: String,
}

fn fixture() -> Fixture {
    let text = include_str!("fixtures/bleu_cases.json");
    serde_json::from_str(text).expect("bleu_cases.json parses")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + b.abs())
}

#[test]
fn fixture_records_its_sacrebleu_version() {
    let f = fixture();
    assert!(
        f.sacrebleu_version.starts_with("2."),
        "{}",
        f.sacrebleu_version
    );
    assert!(f.tokenize_13a.len() >= 100);
    assert!(f.corpora.len() >= 8);
}

#[test]
fn tokenize_13a_matches_sacrebleu() {
    let f = fixture();
    let mut failures = Vec::new();
    for case in &f.tokenize_13a {
        let got = tokenize_13a(&case.input);
        if got != case.output {
            failures.push(format!(
                "input {:?}\n  sacrebleu {:?}\n  shoal     {:?}",
                case.input, case.output, got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn corpus_bleu_matches_sacrebleu() {
    let f = fixture();
    for case in &f.corpora {
        let b = corpus_bleu(&case.hyps, &case.refs).unwrap();
        let name = &case.name;
        assert_eq!(b.counts, case.counts, "{name}: counts");
        assert_eq!(b.totals, case.totals, "{name}: totals");
        assert_eq!(b.sys_len, case.sys_len, "{name}: sys_len");
        assert_eq!(b.ref_len, case.ref_len, "{name}: ref_len");
        assert!(
            close(b.score, case.score),
            "{name}: score {} vs {}",
            b.score,
            case.score
        );
        assert!(close(b.bp, case.bp), "{name}: bp {} vs {}", b.bp, case.bp);
        assert!(
            close(b.ratio, case.ratio),
            "{name}: ratio {} vs {}",
            b.ratio,
            case.ratio
        );
        for n in 0..4 {
            assert!(
                close(b.precisions[n], case.precisions[n]),
                "{name}: precision {} {} vs {}",
                n + 1,
                b.precisions[n],
                case.precisions[n]
            );
        }
        assert_eq!(b.to_string(), case.formatted, "{name}: Display");
    }
}

#[test]
fn fixture_covers_the_edge_cases() {
    let f = fixture();
    let get = |name: &str| f.corpora.iter().find(|c| c.name == name).unwrap();
    assert!((get("perfect").score - 100.0).abs() < 1e-9);
    assert_eq!(get("zero_match").counts, [0; 4]);
    assert_eq!(get("all_hyps_empty").sys_len, 0);
    assert_eq!(get("short_segments").totals[3], 0);
    assert!(get("all").hyps.iter().any(String::is_empty));
}

#[test]
fn mismatched_lengths_are_an_error() {
    let err = corpus_bleu(&["a b c"], &["a b c", "d e f"]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthMismatch {
                left: 1,
                right: 2,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn empty_corpus_scores_zero() {
    let none: [&str; 0] = [];
    let b = corpus_bleu(&none, &none).unwrap();
    assert_eq!(b.score, 0.0);
    assert_eq!((b.sys_len, b.ref_len), (0, 0));
}
