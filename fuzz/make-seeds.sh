#!/usr/bin/env bash
# fuzz/make-seeds.sh: writes the seed corpora (fuzz/seeds/TARGET/) from real files:
# the data shipped in ../shared/data, the ONNX and .shoalz fixtures, and models and
# configurations written by the shoal binary. Run from the repository root after
# `cargo build --release -p shoal`; the seeds are committed, so this is only needed to
# make them again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
S=fuzz/seeds
SHOAL=${SHOAL:-target/release/shoal}
DATA=../shared/data
rm -rf "$S" && mkdir -p "$S"/{frame,ps_messages,click_log,corpus,tokenizer,config,shoalz,onnx,ctr_model,cnn_model,idx,grpc,tls_files}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Frames: a hello and two data frames as the TCP transport writes them (24-byte header:
# "SHL1", version 1, kind, tag, length).
python3 - "$S/frame/three" <<'PY'
import struct, sys
def frame(kind, tag, payload):
    return b"SHL1" + struct.pack("<HHII", 1, kind, tag, 0) + struct.pack("<Q", len(payload)) + payload
open(sys.argv[1], "wb").write(frame(2, 0, struct.pack("<Q", 1) + b"secret")
                              + frame(1, 7, bytes(range(8))) + frame(1, 9, b""))
PY
# Parameter-server requests ([op u8][len u16][payload]): init of 6 values, a push of
# step 0 with one sparse key, a pull, a sparse pull, a state request, goodbye.
python3 - "$S/ps_messages/session" <<'PY'
import struct, sys
def msg(op, payload):
    return bytes([op]) + struct.pack("<H", len(payload)) + payload
f = lambda *v: struct.pack(f"<{len(v)}f", *v)
nan = struct.unpack("<I", struct.pack("<f", float("nan")))[0]
one = struct.unpack("<I", struct.pack("<f", 1.0))[0]
push = struct.pack("<5Q", 0, 6, 1, nan, one) + f(*[0.1] * 6) + struct.pack("<Q", 42) + f(0.5, -0.5)
out = msg(2, f(*[1.0] * 6)) + msg(3, push) + msg(4, struct.pack("<Q", 1)) \
    + msg(5, struct.pack("<2Q", 42, 7)) + msg(7, b"") + msg(9, b"") + msg(6, b"")
open(sys.argv[1], "wb").write(out)
PY
# TLS files: the per-job CA, certificate and key `shoal run --tls` makes, split by zero
# bytes.
"$SHOAL" run --tls -n 1 -- sh -c 'cat "$SHOAL_TLS_DIR/ca.pem"; printf "\000"; cat "$SHOAL_TLS_DIR/cert.pem"; printf "\000"; cat "$SHOAL_TLS_DIR/key.pem"' > "$S/tls_files/job"
head -c 4000 "$DATA/ctr/criteo_sample.txt" > "$S/click_log/criteo.csv"
head -c 4000 "$DATA/ctr/avazu_sample.txt" > "$S/click_log/avazu.csv"
printf '1 0:12:1 1:7:1 2:99:0.5\n0 0:3:1 1:7:1 2:1:1\n1 0:12:1 1:8:1 2:5:1\n' > "$S/click_log/libffm"
printf '1 3:1 17:1 40:0.5\n0 4:1 18:1 41:1\n1 3:1 19:1 40:1\n' > "$S/click_log/libsvm"
{ head -n 20 "$DATA/multi30k/train.en"; printf '\xff'; head -n 20 "$DATA/multi30k/train.de"; } > "$S/corpus/multi30k"

# A trained NMT run's tokenizer; CTR and CNN configurations as --print-config gives them.
"$SHOAL" train nmt --data-dir "$DATA/multi30k" --set data.src_vocab=200 --set data.tgt_vocab=200 \
    --set model.embed=8 --set model.hidden=8 --set model.layers=1 --max-steps 1 --no-eval \
    --out "$tmp/nmt" > /dev/null 2>&1
python3 - "$(find "$tmp/nmt" -name meta.json | head -n 1)" "$S/tokenizer" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
for side in ("src", "tgt"):
    open(f"{sys.argv[2]}/{side}.json", "w").write(m[f"{side}_tokenizer"])
PY
"$SHOAL" train ctr --print-config > "$S/config/ctr.toml"
"$SHOAL" train cnn --print-config > "$S/config/cnn.toml"
printf 'dim=4\nlr=0.5\ndist.ps=2\nmodel.dropout=0.2\n' > "$S/config/set-lines"

cp crates/shoal-cnn/tests/fixtures/onnx/*.onnx "$S/onnx/"
# A small CNN trained on Fashion-MNIST (Debian's dataset-fashion-mnist): each file of its
# saved directory with the byte that picks it in front; and its .shoalz, int8 and
# pruned + 3-bit codebook.
"$SHOAL" train cnn --blocks 4/8 --fc 16 --max-steps 5 --out "$tmp/cnn" > /dev/null 2>&1
{ printf '\x00'; cat "$tmp/cnn/meta.json"; } > "$S/cnn_model/meta.json"
{ printf '\x01'; cat "$tmp/cnn/model.safetensors"; } > "$S/cnn_model/model.safetensors"
"$SHOAL" compress --model "$tmp/cnn" --quant int8 --test-limit 100 --out "$S/shoalz/int8.shoalz" > /dev/null 2>&1
"$SHOAL" compress --model "$tmp/cnn" --prune-fc 0.5 --quant 3 --test-limit 100 --out "$S/shoalz/codebook.shoalz" > /dev/null 2>&1

# A small DeepFM, saved (one file).
"$SHOAL" data gen-ctr --rows 600 --fields 4 --ids-per-field 20 --out "$tmp/clicks.csv" > /dev/null
"$SHOAL" train ctr --data "$tmp/clicks.csv" --dim 4 --hidden 8 --max-steps 2 --out "$tmp/ctr" > /dev/null 2>&1
cp "$tmp/ctr/model.safetensors" "$S/ctr_model/"

python3 - "$S/idx" <<'PY'
import gzip, sys
images = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(12))
labels = bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 7])
open(sys.argv[1] + "/images", "wb").write(images)
open(sys.argv[1] + "/images.gz", "wb").write(gzip.compress(images))
open(sys.argv[1] + "/labels", "wb").write(labels)
PY
# A RegisterRequest (token, role, host, data address) and a HeartbeatRequest, protobuf.
python3 - "$S/grpc" <<'PY'
import sys
def s(field, text):
    b = text.encode()
    return bytes([field << 3 | 2, len(b)]) + b
open(sys.argv[1] + "/register", "wb").write(s(1, "token") + s(2, "worker") + s(3, "127.0.0.1") + s(4, "127.0.0.1:4000"))
open(sys.argv[1] + "/heartbeat", "wb").write(s(1, "token") + bytes([2 << 3, 3]))
PY
echo "seeds written to $S:"; for d in "$S"/*; do echo "  $(basename "$d"): $(ls "$d" | wc -l) files"; done
