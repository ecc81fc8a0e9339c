#!/usr/bin/env python3
"""PyTorch peer for `bench/run nmt-scaling`: the seed NMT model (bench/nmt_train.py's)
trained by one single-threaded process, then by DistributedDataParallel over gloo with
WORLD single-threaded processes, on the batches shoal wrote. Worker w of WORLD trains
on batches w, w+WORLD, ... (weak scaling: the per-worker batch stays the same).

Prints one JSON line: words/s of one process and of the DDP job, and the speed-up.

Usage: nmt_ddp.py --batches FILE [--world N] [--warmup K] [--steps S]
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nmt_train import PAD, Seq2Seq, read_batches  # noqa: E402


def train(rank, world, path, warmup, steps, port, out):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    header, batches = read_batches(path)
    model = Seq2Seq(header["src_vocab"], header["tgt_vocab"])
    if world > 1:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD)
    params = list(model.parameters())
    mine = [batches[(s * world + rank) % len(batches)] for s in range(warmup + steps)]
    words = sum(int((b[2] != PAD).sum()) for b in mine[warmup:])
    # The encoder is packed to each source's real tokens (as in nmt_train.py); the
    # lengths are counted up front so the timed loop holds only training.
    lens = [(b[0] != PAD).sum(1) for b in mine]
    t0 = None
    for s, (src, tgt_in, tgt_out) in enumerate(mine):
        if s == warmup:
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
        logits = model(src, lens[s], tgt_in)
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP's allreduce overlaps this and is waited for at its end
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    seconds = time.perf_counter() - t0
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    out.put((rank, words, seconds))


def run(world, path, warmup, steps, port):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=train, args=(r, world, path, warmup, steps, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = [q.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            sys.exit(f"nmt_ddp.py: a worker exited with status {p.exitcode}")
    words = sum(r[1] for r in res)
    seconds = max(r[2] for r in res)
    return words / seconds, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", required=True)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--port", type=int, default=29517)
    a = p.parse_args()
    one, one_s = run(1, a.batches, a.warmup, a.steps, a.port)
    many, many_s = run(a.world, a.batches, a.warmup, a.steps, a.port)
    print(json.dumps({
        "single_words_per_s": one,
        "ddp_words_per_s": many,
        "world": a.world,
        "speedup": many / one,
        "efficiency": many / one / a.world,
        "steps_per_worker": a.steps,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
