//! The BPE subword tokenizer, trained on real Multi30k English text.

use std::path::Path;
use std::sync::OnceLock;

use shoal_data::tokenizer::SPECIAL_TOKENS;
use shoal_data::{read_lines, Error, SubwordTokenizer, BOS, EOS, PAD, UNK};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/multi30k");
const VOCAB: usize = 2000;

fn lines(name: &str, n: usize) -> Vec<String> {
    let mut lines = read_lines(&Path::new(DATA).join(name)).unwrap();
    lines.truncate(n);
    lines
}

fn train_lines() -> &'static [String] {
    static LINES: OnceLock<Vec<String>> = OnceLock::new();
    LINES.get_or_init(|| lines("train.en", 3000))
}

fn trained() -> &'static SubwordTokenizer {
    static TOK: OnceLock<SubwordTokenizer> = OnceLock::new();
    TOK.get_or_init(|| SubwordTokenizer::train(train_lines(), VOCAB).unwrap())
}

#[test]
fn special_tokens_have_ids_0_to_3() {
    let tok = trained();
    for (id, name) in [(PAD, "<pad>"), (UNK, "<unk>"), (BOS, "<s>"), (EOS, "</s>")] {
        assert_eq!(tok.token_to_id(name), Some(id));
        assert_eq!(tok.id_to_token(id).as_deref(), Some(name));
        assert_eq!(SPECIAL_TOKENS[id as usize], name);
    }
}

#[test]
fn vocab_size_is_honoured() {
    assert_eq!(trained().vocab_size(), VOCAB);
    // Smaller than the alphabet: the rarest characters are left out and become UNK.
    let small = SubwordTokenizer::train(train_lines(), 40).unwrap();
    assert_eq!(small.vocab_size(), 40);
    let ids = small.encode("Zebra quiz: 7 jazzy boxes!").unwrap();
    assert!(ids.contains(&UNK), "{ids:?}");
    assert!(ids.iter().all(|&id| (id as usize) < 40));
}

#[test]
fn subwords_are_shorter_than_characters() {
    let tok = trained();
    let s = "A man in a blue shirt is standing on a ladder cleaning windows.";
    let ids = tok.encode(s).unwrap();
    assert!(ids.len() < s.split(' ').count() * 2, "{} ids", ids.len());
    assert!(ids.len() >= s.split(' ').count(), "{} ids", ids.len());
}

#[test]
fn decode_of_encode_restores_plain_sentences() {
    let tok = trained();
    for s in train_lines().iter().take(500) {
        let ids = tok.encode(s).unwrap();
        assert!(!ids.contains(&UNK), "{s:?} -> {ids:?}");
        assert_eq!(&tok.decode(&ids).unwrap(), s);
    }
    // Held-out sentences: all characters of plain English text are known.
    for s in &lines("val.en", 300) {
        let ids = tok.encode(s).unwrap();
        assert_eq!(&tok.decode(&ids).unwrap(), s, "{ids:?}");
    }
}

#[test]
fn encode_adds_no_bos_or_eos_and_decode_skips_specials() {
    let tok = trained();
    let s = "Two dogs play in the snow.";
    let ids = tok.encode(s).unwrap();
    assert!(!ids.is_empty());
    assert!(ids.iter().all(|&id| id > EOS), "{ids:?}");
    let mut framed = vec![BOS];
    framed.extend(&ids);
    framed.extend([EOS, PAD, PAD]);
    assert_eq!(tok.decode(&framed).unwrap(), s);
    assert_eq!(tok.decode(&[]).unwrap(), "");
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let err = trained().decode(&[5, VOCAB as u32]).unwrap_err();
    assert!(matches!(err, Error::Tokenizer(_)), "{err:?}");
}

#[test]
fn json_round_trip_gives_identical_encodings() {
    let tok = trained();
    let json = tok.to_json().unwrap();
    let back = SubwordTokenizer::from_json(&json).unwrap();
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.to_json().unwrap(), json);
    for s in &lines("val.en", 200) {
        let ids = tok.encode(s).unwrap();
        assert_eq!(back.encode(s).unwrap(), ids);
        assert_eq!(back.decode(&ids).unwrap(), tok.decode(&ids).unwrap());
    }
}

#[test]
fn from_json_rejects_garbage() {
    for bad in ["", "not json", "{}", "{\"model\": 3}", "[1, 2, 3]"] {
        let err = SubwordTokenizer::from_json(bad).unwrap_err();
        assert!(matches!(err, Error::Tokenizer(_)), "{bad:?}: {err:?}");
        assert!(err.to_string().contains("tokenizer"), "{err}");
    }
    // Valid tokenizer JSON whose special tokens sit elsewhere.
    let json = trained()
        .to_json()
        .unwrap()
        .replace("\"<pad>\"", "\"<PAD>\"");
    let err = SubwordTokenizer::from_json(&json).unwrap_err();
    assert!(err.to_string().contains("<pad>"), "{err}");
}

#[test]
fn training_is_deterministic() {
    let a = SubwordTokenizer::train(&train_lines()[..1000], 500).unwrap();
    let b = SubwordTokenizer::train(&train_lines()[..1000], 500).unwrap();
    assert_eq!(a.to_json().unwrap(), b.to_json().unwrap());
}

#[test]
fn nfkc_normalises_compatibility_characters() {
    let tok = trained();
    // U+FB01 (the "fi" ligature) and a full-width "A" normalise to plain letters.
    assert_eq!(
        tok.encode("\u{fb01}ve \u{ff21}").unwrap(),
        tok.encode("five A").unwrap()
    );
}

#[test]
fn bad_arguments_are_errors() {
    let err = SubwordTokenizer::train(train_lines(), 4).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                name: "vocab_size",
                ..
            }
        ),
        "{err:?}"
    );
    let err = SubwordTokenizer::train(&[String::new(), " ".into()], 100).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "lines", .. }),
        "{err:?}"
    );
}
