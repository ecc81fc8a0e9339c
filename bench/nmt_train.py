#!/usr/bin/env python3
"""PyTorch peer for `bench/run nmt-train`: trains the seed's NMT model on CPU.

Reads the batches shoal wrote (`shoal bench nmt-train --dump-batches FILE`), trains the
same model with the same optimiser on exactly those batches, and prints one JSON line.

Batch file, little-endian:
    b"SHOALNB1"
    u32 steps, batch, src_len, tgt_len, src_vocab, tgt_vocab
    per step: src [batch*src_len] u32, tgt_in [batch*tgt_len] u32, tgt_out [batch*tgt_len] u32
    (row-major [batch, len]; PAD = 0; tgt_in = BOS + y, tgt_out = y + EOS)

Model (must match shoal's): encoder Embedding(src_vocab, 128) -> GRU(128, 128, 3 layers)
over each source's real tokens (packed: the final states are those after the last real
token, as shoal's masked recurrence gives); decoder Embedding(tgt_vocab, 128) ->
GRU(128, 128, 3 layers) started from the encoder's final hidden state ->
Linear(128, tgt_vocab). No attention, no dropout. Loss: mean cross-entropy over non-PAD
target tokens. Adam(lr 1e-3, betas 0.9/0.999, eps 1e-8), gradient norm clipped to 1.0.

With --init FILE (shoal writes FILE.init.safetensors beside the batches) the model starts
from shoal's initial weights (same gate order: only the names differ), so both train the
same function from the same point on the same batches and their per-step losses (printed
as "losses") must agree to float noise; bench/run compares them.

Usage: nmt_train.py --batches FILE [--init WEIGHTS] [--warmup K] [--threads N]
"""

import argparse
import json
import resource
import struct
import sys
import time

import numpy as np
import torch
from torch import nn

# Peak RSS once torch is loaded, before any work: most of the peer's memory is this.
IMPORT_RSS_MB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

MAGIC = b"SHOALNB1"
HIDDEN = 128
LAYERS = 3
PAD = 0


class Seq2Seq(nn.Module):
    """GRU encoder-decoder without attention."""

    def __init__(self, src_vocab, tgt_vocab):
        super().__init__()
        self.src_emb = nn.Embedding(src_vocab, HIDDEN)
        self.encoder = nn.GRU(HIDDEN, HIDDEN, num_layers=LAYERS, batch_first=True)
        self.tgt_emb = nn.Embedding(tgt_vocab, HIDDEN)
        self.decoder = nn.GRU(HIDDEN, HIDDEN, num_layers=LAYERS, batch_first=True)
        self.out = nn.Linear(HIDDEN, tgt_vocab)

    def forward(self, src, src_lens, tgt_in):
        """src [B, S] (left-aligned, PAD after), src_lens [B], tgt_in [B, T] (int64) ->
        logits [B, T, tgt_vocab]."""
        packed = nn.utils.rnn.pack_padded_sequence(
            self.src_emb(src), src_lens, batch_first=True, enforce_sorted=False
        )
        _, h = self.encoder(packed)  # h [LAYERS, B, HIDDEN]
        y, _ = self.decoder(self.tgt_emb(tgt_in), h)  # y [B, T, HIDDEN]
        return self.out(y)

    def load_shoal(self, path):
        """Copies shoal's initial weights (a safetensors file, shoal's names) in."""
        tensors = read_safetensors(path)
        names = {"src_emb.weight": "src_embed", "tgt_emb.weight": "tgt_embed",
                 "out.weight": "out_weight", "out.bias": "out_bias"}
        for side in ("encoder", "decoder"):
            for l in range(LAYERS):
                for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    names[f"{side}.{w}_l{l}"] = f"{side}.{l}.{w}"
        state = self.state_dict()
        if set(names) != set(state):
            raise ValueError(f"model parameters {sorted(state)} are not the mapped ones")
        if set(names.values()) != set(tensors):
            raise ValueError(f"{path}: holds {sorted(tensors)}, expected {sorted(names.values())}")
        with torch.no_grad():
            for mine, theirs in names.items():
                t = torch.from_numpy(tensors[theirs].copy())
                if t.shape != state[mine].shape:
                    raise ValueError(f"{path}: {theirs} is {tuple(t.shape)}, expected {tuple(state[mine].shape)}")
                state[mine].copy_(t)


def read_safetensors(path):
    """{name: float32 numpy array} of a safetensors file (F32 tensors only)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors header")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > len(data) - 8:
        raise ValueError(f"{path}: header length {n} past the end")
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {meta['dtype']}, expected F32")
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(data, dtype="<f4", count=(b - a) // 4, offset=8 + n + a).reshape(meta["shape"])
    return out


def read_batches(path):
    """Returns (header dict, list of (src, tgt_in, tgt_out) int64 tensors)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 + 6 * 4:
        raise ValueError(f"{path}: {len(data)} bytes, shorter than the header")
    if data[:8] != MAGIC:
        raise ValueError(f"{path}: bad magic {data[:8]!r}, expected {MAGIC!r}")
    fields = struct.unpack_from("<6I", data, 8)
    steps, batch, src_len, tgt_len, src_vocab, tgt_vocab = fields
    per_step = batch * src_len + 2 * batch * tgt_len
    body = np.frombuffer(data, dtype="<u4", offset=8 + 6 * 4)
    if body.size != steps * per_step:
        raise ValueError(
            f"{path}: {body.size} u32 after the header, expected "
            f"{steps} steps x {per_step} = {steps * per_step}"
        )
    out = []
    for s in range(steps):
        off = s * per_step
        parts = []
        for n, length in ((batch * src_len, src_len), (batch * tgt_len, tgt_len), (batch * tgt_len, tgt_len)):
            a = body[off : off + n].astype(np.int64).reshape(batch, length)
            parts.append(torch.from_numpy(a))
            off += n
        src, tgt_in, tgt_out = parts
        if src.max() >= src_vocab or tgt_in.max() >= tgt_vocab or tgt_out.max() >= tgt_vocab:
            raise ValueError(f"{path}: step {s}: token id out of vocabulary")
        out.append((src, tgt_in, tgt_out))
    header = dict(
        steps=steps, batch=batch, src_len=src_len, tgt_len=tgt_len,
        src_vocab=src_vocab, tgt_vocab=tgt_vocab,
    )
    return header, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", required=True, help="batch file written by shoal")
    p.add_argument("--init", help="shoal's initial weights (FILE.init.safetensors)")
    p.add_argument("--warmup", type=int, default=5, help="first K steps are not timed")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    try:
        header, batches = read_batches(args.batches)
    except (OSError, ValueError) as e:
        sys.exit(f"nmt_train.py: {e}")
    if not 0 <= args.warmup < len(batches):
        sys.exit(f"nmt_train.py: --warmup {args.warmup} must leave a timed step of {len(batches)}")

    model = Seq2Seq(header["src_vocab"], header["tgt_vocab"])
    if args.init:
        try:
            model.load_shoal(args.init)
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"nmt_train.py: {e}")
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD, reduction="mean")
    params = list(model.parameters())

    # Count the target words up front so the timed loop holds only training.
    words = sum(int((b[2] != PAD).sum()) for b in batches[args.warmup :])
    # Source lengths (on the CPU, as pack_padded_sequence wants them), also up front.
    src_lens = [(b[0] != PAD).sum(1) for b in batches]
    losses = []
    t0 = None
    for step, (src, tgt_in, tgt_out) in enumerate(batches):
        if step == args.warmup:
            t0 = time.perf_counter()
        logits = model(src, src_lens[step], tgt_in)
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    steps_timed = len(batches) - args.warmup

    print(json.dumps({
        "words_per_s": words / seconds,
        "steps_timed": steps_timed,
        "seconds": seconds,
        "words": words,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "import_rss_mb": IMPORT_RSS_MB,
        "torch": torch.__version__,
        "threads": args.threads,
        "steps_in_file": header["steps"],
        **{k: v for k, v in header.items() if k != "steps"},
    }))


if __name__ == "__main__":
    main()
