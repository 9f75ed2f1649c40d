"""Generation speed of the seed config (82M) on this CPU, against the machine's memory roofline and an
original-style loop, all measured in one run.

- The machine's limits: read bandwidth (x.sum() over 1 GiB fp32) and bf16/fp32 matmul peaks.
- The sampling kernels' step times at each run's shape (10 rows or 1, 512 cached tokens), measured now as
  generate.py's trial measures them, and the fastest (what generate.py picks) used for the run.
- The reference command (10 samples x 1000 new tokens, one batch) and one sample of 1000 tokens (a user at a
  terminal or a web page), --repeats runs each, as a fraction of its roofline: the bytes a step must read at
  least (bf16 weights, the output layer included, + a bf16 cache of the tokens so far), summed over the run, over
  the bandwidth read before, between and after the runs: x.sum() over a fresh 1 GiB (median, highest) and over the
  weights the step streams (median); and of the roofline of bandwidth and bf16 matmul peak together (two FLOPs per
  weight and row). The kernel's set-up (compiling) happens
  in the trial, before the runs.
- Original style: batch 1, no cache, fp32, timed for --original_tokens tokens at a context of 500 and stated per token.
Run from the project root: python bench/generate_speed.py
"""
import argparse
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, matmul_peak, read_bandwidth  # noqa: E402

from gpt2zh import native  # noqa: E402
from gpt2zh.decoding import decode_step, kernel_candidates, measure_kernels  # noqa: E402
from gpt2zh.devices import bf16_supported  # noqa: E402
from gpt2zh.model import build_model, count_parameters, load_config  # noqa: E402
from gpt2zh.sampling import make_logits_processors, sample  # noqa: E402


def roofline(model, rows, prefix, length, int8=False):
    """(bytes, FLOPs) a run needs at least: bf16 weights read each step (the position table and the embedding
    lookups aside: the tied output layer reads the token table whole) and a bf16 KV cache of the tokens so far, or
    with `int8` the int8-cpp kernel's bytes (a byte a weight; a byte a cached element and an fp32 scale a head's
    vector); two FLOPs per weight and row, four per cached key or value element and row."""
    config = model.config
    weights = count_parameters(model) - config.n_positions * config.n_embd
    cached = sum(min(prefix + step, config.n_ctx) for step in range(length))
    cache_elements = rows * config.n_layer * 2 * config.n_embd * cached  # keys and values
    weight_bytes, cache_bytes = (1, 1 + 4 / (config.n_embd // config.n_head)) if int8 else (2, 2)
    return (length * weight_bytes * weights + cache_bytes * cache_elements,
            length * 2 * rows * weights + 2 * cache_elements)


def own_weights_bandwidth(step, model, repeats=3):
    """Bytes a second x.sum() reads over the weights the step streams (the C++ step's packed copies, else the
    model's): on a VM the speed of memory depends on where the pages landed, fixed for the process's lifetime."""
    weights = [t for t in getattr(step, "params", []) if t is not None and t.dtype in (torch.bfloat16, torch.uint8)]
    weights = weights or [p.detach() for p in model.parameters() if p.dim() == 2]
    # read as fp32 words (the same bytes): a bf16 sum would convert every value and could be bound by that instead
    weights = [t.reshape(-1).view(torch.float32) if t.element_size() < 4 and t.numel() * t.element_size() % 4 == 0
               else t for t in weights]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for tensor in weights:
            tensor.sum()
        best = min(best, time.perf_counter() - start)
    return sum(t.numel() * t.element_size() for t in weights) / best


def timed_run(model, step, rows, prefix, length, processors, n_ctx):
    start = time.perf_counter()
    sample(model, prefix, length, rows, processors, n_ctx, step=step)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_config", default="config/model_config_small.json")
    parser.add_argument("--nsamples", type=int, default=10)
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--original_tokens", type=int, default=20)
    parser.add_argument("--sampling_kernel", default="auto", help="as generate.py's")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each command, with the bandwidth read before, between and after them")
    args = parser.parse_args()
    config = load_config(args.model_config)
    print(f"machine: {machine()}")
    bandwidth = read_bandwidth()
    # a CPU without fast bf16 emulates a bf16 matmul for minutes: its kernels compute in fp32, so only that peak
    fast_bf16 = bf16_supported(torch.device("cpu"))
    peaks = {"fp32": matmul_peak(torch.float32), **({"bf16": matmul_peak(torch.bfloat16)} if fast_bf16 else {})}
    print(f"limits: read bandwidth {bandwidth / 1e9:.1f} GB/s (read again around every run below); matmul peak "
          + ", ".join(f"{name} {peak / 1e12:.3f}" for name, peak in peaks.items()) + " TFLOP/s")

    torch.manual_seed(0)
    model = build_model(config).eval()  # as generate.py loads it
    dtype, arithmetic = (torch.bfloat16, "bf16") if fast_bf16 else (torch.float32, "fp32")
    model.to(dtype)
    processors = make_logits_processors(1.0, 8, 1.0, 1.0, [1, 0])
    prefix = [2, 100, 200, 300, 400, 500, 600]
    for rows, what in ((args.nsamples, "reference command"), (1, "one sample")):
        timings = measure_kernels(model, rows, config.n_ctx // 2, config.n_ctx)  # measured now, not remembered
        chosen = min(timings, key=timings.get) if args.sampling_kernel == "auto" else args.sampling_kernel
        print(f"sampling kernels, a step of {rows} rows over {config.n_ctx // 2} cached tokens (set-up spread over "
              f"{config.n_ctx} steps): "
              + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in timings.items())
              + f" -> {chosen}")
        step = decode_step(model, kernel_candidates(model)[chosen], rows)
        if chosen.endswith("-cpp"):
            print(f"  {chosen}: {native.arithmetic()}")
        needed, flops = roofline(model, rows, len(prefix), args.length, int8=chosen == "int8-cpp")
        # x.sum() over a fresh 1 GiB reads ~33 GB/s on this VM most of the time and 55-65 GB/s at other moments (which
        # a C++ streaming loop run at the same moment mostly does not see); the bytes the step itself streams, its
        # weights, read at a speed fixed by where they landed. So the bandwidth is read three ways, before, between
        # and after the runs: fresh 1 GiB (median and highest) and x.sum() over the step's own weights.
        readings, own, runs = [read_bandwidth(repeats=3)], [own_weights_bandwidth(step, model)], []
        for _ in range(args.repeats):
            runs.append(timed_run(model, step, rows, prefix, args.length, processors, config.n_ctx))
            readings.append(read_bandwidth(repeats=3))
            own.append(own_weights_bandwidth(step, model))
        typical, top, own_typical, median_run = median(readings), max(readings), median(own), median(runs)
        print(f"{what} ({rows} x {args.length} tokens, {dtype}, {needed / 1e9:.0f} GB to read): runs "
              + ", ".join(f"{seconds:.1f}" for seconds in runs) + f" s ({rows * args.length / min(runs):,.0f} tokens/s "
              f"at best)")
        print("  bandwidth: fresh 1 GiB " + ", ".join(f"{reading / 1e9:.0f}" for reading in readings)
              + " GB/s; the step's own weights " + ", ".join(f"{reading / 1e9:.0f}" for reading in own) + " GB/s")
        print(f"  of the bandwidth roofline, median run: {100 * needed / own_typical / median_run:.0f}% against the "
              f"own weights' median ({own_typical / 1e9:.0f} GB/s), {100 * needed / typical / median_run:.0f}% against "
              f"fresh 1 GiB's median ({typical / 1e9:.0f}), {100 * needed / top / median_run:.0f}% against the highest "
              f"({top / 1e9:.0f})")
        # With several rows the products, not the reading, can bound a step on a CPU with few cores
        floor = max(needed / max(typical, own_typical), flops / peaks[arithmetic])
        print(f"  {flops / 1e12:.2f} TFLOP, {flops / peaks[arithmetic]:.1f} s at the {arithmetic} peak: the median run "
              f"is {100 * floor / median_run:.0f}% of the roofline of bandwidth (the higher median) and "
              f"{arithmetic} peak together ({floor:.1f} s)")
        seconds = min(runs)
        if rows == args.nsamples:
            reference_seconds = seconds

    torch.manual_seed(0)
    model = build_model(config).eval()  # the same weights, unpacked and fp32, as the original ran
    context = prefix + list(range(1000, 1000 + 500 - len(prefix)))
    start = time.perf_counter()
    sample(model, context, args.original_tokens, 1, processors, config.n_ctx, use_cache=False)
    per_token = (time.perf_counter() - start) / args.original_tokens
    tokens = args.nsamples * args.length
    print(f"original style (batch 1, no cache, fp32, context ~500): {per_token:.3f} s a token "
          f"({1 / per_token:.1f} tokens/s) -> about {per_token * tokens:,.0f} s for the reference command")
    print(f"speed-up: {per_token * tokens / reference_seconds:.0f}x")


if __name__ == "__main__":
    main()
