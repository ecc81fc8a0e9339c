#!/usr/bin/env python3
"""One process of `bench/run torch-ddp`'s exchange measurement, started by `shoal run -n
2 -- python bench/torch_allreduce.py --backend gloo|shoal --values N`: the time of one
in-place sum of N float32 values across the processes (torch.distributed.all_reduce
over gloo, or shoal.torch.allreduce_ over shared memory), the median of 20 calls after 3
warm-up calls. Rank 0 prints one JSON line."""

import argparse
import json
import statistics
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["gloo", "shoal"], required=True)
    p.add_argument("--values", type=int, required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    t = torch.ones(a.values)
    if a.backend == "gloo":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()

        def reduce():
            dist.all_reduce(t)
    else:
        import shoal.torch as sh

        sh.init()
        rank = sh.rank()

        def reduce():
            sh.allreduce_(t, op=sh.Sum)
    for _ in range(3):
        reduce()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        reduce()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"backend": a.backend, "values": a.values, "ms": 1e3 * statistics.median(times)}), flush=True)
    if a.backend == "gloo":
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
