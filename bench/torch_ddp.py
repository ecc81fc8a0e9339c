#!/usr/bin/env python3
"""One process of `bench/run torch-ddp`, started by `shoal run -n WORLD -- python
bench/torch_ddp.py ...` (which sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): the
seed's NMT model (bench/nmt_train.py's) trained on the batches shoal wrote, rank r of
WORLD on batches r, r + WORLD, ..., one thread per process; gradients averaged either
by PyTorch's DistributedDataParallel over gloo (`--backend gloo`) or by shoal.torch's
DistributedOptimizer (`--backend shoal`). The same model, batches, optimizer and
clipping either way.

Rank 0 prints one JSON line: the job's target words/s over the timed steps, and the
final loss (the two backends start from the same weights and must end on the same
loss, to float noise).

Usage: torch_ddp.py --backend gloo|shoal --batches FILE [--warmup K] [--steps S]
       [--bucket-mb MB]
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nmt_train import PAD, Seq2Seq, read_batches  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["gloo", "shoal"], required=True)
    p.add_argument("--batches", required=True)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    header, batches = read_batches(a.batches)
    model = Seq2Seq(header["src_vocab"], header["tgt_vocab"])
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    if a.backend == "gloo":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        net = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=a.bucket_mb)
        barrier = dist.barrier
    else:
        import shoal.torch as sh

        sh.init()
        rank, world = sh.rank(), sh.size()
        net = model
        opt = sh.DistributedOptimizer(opt, named_parameters=model.named_parameters(), bucket_cap_mb=a.bucket_mb)
        barrier = sh.barrier
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD)
    mine = [batches[(s * world + rank) % len(batches)] for s in range(a.warmup + a.steps)]
    words = sum(int((b[2] != PAD).sum()) for b in mine[a.warmup:])
    lens = [(b[0] != PAD).sum(1) for b in mine]
    t0 = None
    loss = None
    for s, (src, tgt_in, tgt_out) in enumerate(mine):
        if s == a.warmup:
            barrier()
            t0 = time.perf_counter()
        logits = net(src, lens[s], tgt_in)
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # both backends reduce buckets while this runs
        if a.backend == "shoal":
            opt.synchronize()  # the averaged gradients, before clipping
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    barrier()
    seconds = time.perf_counter() - t0
    total = torch.tensor([float(words)])
    if a.backend == "gloo":
        dist.all_reduce(total)
        dist.destroy_process_group()
    else:
        sh.allreduce_(total, op=sh.Sum)
    if rank == 0:
        print(json.dumps({
            "backend": a.backend,
            "world": world,
            "words_per_s": total.item() / seconds,
            "seconds": seconds,
            "steps_per_worker": a.steps,
            "last_loss_rank0": loss.item(),
            "params": sum(p.numel() for p in params),
            "torch": torch.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
