"""The C++ step on a busy machine. When other programs keep the cores busy, the scheduler at times puts the step's
two OpenMP threads on one core, where each of its ~20 parallel regions a step waits for a thread spinning beside it.
That case made certain: GNU OpenMP told to bind both threads to core 0 (GOMP_CPU_AFFINITY="0 0"), against the same
two threads on two cores ("0 1"), each with torch's thread count held (the step before native.ThreadCount) and with
ThreadCount choosing. The seed config (10 layers x 768), one row, 512 cached tokens; each case in its own process
(OpenMP reads the affinity when it starts). Linux with GNU OpenMP; the machine otherwise idle.
Run from the project root: python bench/busy_machine.py
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CASES = [("0 1", "held"), ("0 1", "ThreadCount"), ("0 0", "held"), ("0 0", "ThreadCount")]


def measure(kernel_name, threads, steps, keys=512):
    """{'median', 'mean'} ms a step of `kernel_name` over `steps` steps, and the thread counts ThreadCount used."""
    import torch

    from gpt2zh.decoding import decode_step, kernel_candidates, preallocated_cache, rewind
    from gpt2zh.model import build_model, load_config

    torch.set_num_threads(2)
    model = build_model(load_config(ROOT / "config" / "model_config_small.json")).eval().to(torch.bfloat16)
    kernel = kernel_candidates(model)[kernel_name]
    step, ids, used = decode_step(model, kernel), torch.full((1,), 5), []
    choose = torch.get_num_threads if threads == "held" else step.threads.choose
    step.threads.choose = lambda: used.append(choose()) or used[-1]  # the counts the step ran on
    cache = preallocated_cache(model, keys + 1, kernel.cache_dtype)
    step(ids, cache)  # allocates the cache
    for layer in cache.layers:
        layer.pretend_filled(keys)
    used.clear()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step(ids, cache)
        seconds.append(time.perf_counter() - start)
        rewind(cache, keys)
    return {"median": statistics.median(seconds) * 1e3, "mean": statistics.mean(seconds) * 1e3,
            "one thread": used.count(1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="steps timed in each case")
    p.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # kernel, held|ThreadCount: one case, run by main
    args = p.parse_args()
    if args.case:
        print(json.dumps(measure(*args.case, args.steps)))
        return
    from common import machine

    print(machine())
    for kernel in ("int8-cpp", "bf16-cpp"):
        quiet = None
        for affinity, threads in CASES:
            env = {**os.environ, "GOMP_CPU_AFFINITY": affinity}
            command = [sys.executable, __file__, "--steps", str(args.steps), "--case", kernel, threads]
            result = json.loads(subprocess.run(command, env=env, capture_output=True, text=True,
                                               check=True).stdout.splitlines()[-1])
            quiet = quiet or result["median"]
            print(f"{kernel}, threads on cores {affinity}, {threads}: median {result['median']:.2f} ms a step "
                  f"({result['median'] / quiet:.2f}x two threads on two cores), mean {result['mean']:.2f} ms, "
                  f"{result['one thread']} of {args.steps} steps on one thread", flush=True)


if __name__ == "__main__":
    main()
