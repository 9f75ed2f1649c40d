"""Generation speed of the seed config (82M) on this CPU: the reference command against an original-style loop.

Reference: 10 samples x 1000 new tokens, one batch, preallocated KV cache (fp32 on CPU), bf16 weights packed
for oneDNN (what generate.py does).
Original style: batch 1, no cache (the whole context re-encoded for every token), fp32. Its cost grows
with the context, so it is timed for --original_tokens tokens starting at a context of 500 (the mean
over a 1000-token sample) and stated per token. Run from the project root: python bench/generate_speed.py
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402
from gpt2zh.devices import bf16_supported  # noqa: E402
from gpt2zh.model import build_model, load_config  # noqa: E402
from gpt2zh.sampling import make_logits_processors, pack_for_cpu_sampling, sample  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_config", default="config/model_config_small.json")
    parser.add_argument("--nsamples", type=int, default=10)
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--original_tokens", type=int, default=20)
    args = parser.parse_args()
    config = load_config(args.model_config)
    torch.manual_seed(0)
    model = build_model(config).eval()  # as generate.py loads it: our attention, which takes an fp32 cache
    processors = make_logits_processors(1.0, 8, 1.0, 1.0, [1, 0])
    prefix = [2, 100, 200, 300, 400, 500, 600]
    print(f"machine: {machine()}")

    dtype = torch.bfloat16 if bf16_supported(torch.device("cpu")) else torch.float32
    model.to(dtype)
    pack_for_cpu_sampling(model, args.nsamples)
    start = time.perf_counter()
    sample(model, prefix, args.length, args.nsamples, processors, config.n_ctx)
    ours = time.perf_counter() - start
    tokens = args.nsamples * args.length
    print(f"reference command ({args.nsamples} x {args.length} tokens, batch {args.nsamples}, KV cache, {dtype}): "
          f"{ours:.1f} s ({tokens / ours:,.0f} tokens/s)")

    torch.manual_seed(0)
    model = build_model(config).eval()  # the same weights, unpacked and fp32, as the original ran
    context = prefix + list(range(1000, 1000 + 500 - len(prefix)))
    start = time.perf_counter()
    sample(model, context, args.original_tokens, 1, processors, config.n_ctx, use_cache=False)
    per_token = (time.perf_counter() - start) / args.original_tokens
    print(f"original style (batch 1, no cache, fp32, context ~500): {per_token:.3f} s a token "
          f"({1 / per_token:.1f} tokens/s) -> about {per_token * tokens:,.0f} s for the reference command")
    print(f"speed-up: {per_token * tokens / ours:.0f}x")


if __name__ == "__main__":
    main()
