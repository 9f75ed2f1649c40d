"""Where a GPU training step of the seed config spends its time: tokens/s and MFU per batch size and
attention backend, with and without attention dropout, the share of each step the GPU is busy, and the
kernels that take the most time.

The step is train.py's: the model and its loss compiled, bf16 autocast, fused AdamW, gradient clipping,
batches copied from pinned memory. Run on a CUDA machine from the project root:
    python bench/gpu_train_profile.py [--batch_sizes 8 16 32] [--backends default flash cudnn efficient]
        [--attn_dropout on off] [--peak_tflops 989]
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import flops_per_token, our_recipe  # noqa: E402

from gpt2zh.model import count_parameters, load_config  # noqa: E402
from gpt2zh.training import to_device  # noqa: E402

BACKENDS = {"default": contextlib.nullcontext,
            "flash": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION),
            "cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION),
            "efficient": lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_config", default="config/model_config_small.json")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per batch size")
    parser.add_argument("--backends", nargs="+", default=["default"], choices=sorted(BACKENDS),
                        help="SDPA attention backends to time: default is torch's own choice")
    parser.add_argument("--attn_dropout", nargs="+", default=["on"], choices=["on", "off"],
                        help="time with the config's attention dropout (on) and/or without it (off)")
    parser.add_argument("--peak_tflops", type=float, default=989, help="the GPU's dense bf16 peak")
    args = parser.parse_args()
    device = torch.device("cuda")
    config = load_config(args.model_config)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for attn_dropout in args.attn_dropout:
        for backend in args.backends:
            print(f"\nattention dropout {attn_dropout}, SDPA backend {backend}")
            try:
                with BACKENDS[backend]():
                    profile(config, args, device, attn_dropout == "on")
            except RuntimeError as error:  # a backend that does not run here (GPU, dtype, dropout)
                print(f"    failed: {str(error).splitlines()[0][:200]}")


def profile(config, args, device, attn_dropout):
    torch.manual_seed(0)
    torch._dynamo.reset()  # compile again under this backend
    lm, train_step = our_recipe(config, attn_dropout=attn_dropout, compile_model=True, device=device)
    flops = flops_per_token(lm)
    rng = np.random.default_rng(0)
    print(f"{count_parameters(lm):,} parameters, {flops / 1e6:.0f} MFLOP a token")

    def step(batch_size):
        train_step(to_device(torch.from_numpy(rng.integers(0, config.vocab_size, (batch_size, config.n_ctx))), device))

    for batch_size in args.batch_sizes:
        start = time.perf_counter()
        for _ in range(3):
            step(batch_size)
        torch.cuda.synchronize()
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.steps):
            step(batch_size)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        tokens_per_s = batch_size * config.n_ctx / seconds
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step(batch_size)
            torch.cuda.synchronize()
        events = prof.key_averages()
        busy = sum(e.self_device_time_total for e in events) / 5 / 1e6  # seconds of kernels a step
        print(f"batch {batch_size} x {config.n_ctx}: {seconds * 1e3:.1f} ms a step, {tokens_per_s:,.0f} tokens/s, "
              f"MFU {100 * tokens_per_s * flops / (args.peak_tflops * 1e12):.1f}% of "
              f"{args.peak_tflops:.0f} TFLOP/s; GPU busy {100 * busy / seconds:.0f}% of the step "
              f"(warm-up incl. compiling {warmup:.0f} s)")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:8]:
            print(f"    {e.self_device_time_total / 5 / 1e3:7.2f} ms  {e.key[:100]}")


if __name__ == "__main__":
    main()
