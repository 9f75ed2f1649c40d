"""Training throughput on this CPU, the original recipe against ours: the seed config (82M, n_ctx 1024) unless
--model_config names another.

Run from the project root: python bench/train_speed.py [--steps 3] [--batch_size 1] [--compile]
Every variant runs in this one process on the same machine; ratios are against the original recipe.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import flops_per_token, machine, matmul_peak, our_recipe  # noqa: E402

from gpt2zh.model import load_config, quiet_transformers  # noqa: E402


def original_recipe(config):
    """fp32, eager attention with its dropout, transformers' loss, plain AdamW: what GPT2-Chinese did."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel._from_config(config, attn_implementation="eager").train()
    model.loss_type = "ForCausalLM"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)

    def step(batch):
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return model, step


def measure(step, batch, steps):
    step(batch)  # warm-up (and compilation)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return batch.numel() * steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_config", default="config/model_config_small.json")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant")
    parser.add_argument("--batch_size", type=int, default=1, help="windows of n_ctx tokens per step")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of our recipe")
    args = parser.parse_args()
    quiet_transformers()
    config = load_config(args.model_config)
    n_ctx = config.n_ctx
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"machine: {machine()}")
    print(f"matmul peak (2048^3): fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s")
    batch = torch.randint(5, config.vocab_size, (args.batch_size, n_ctx))
    ours = lambda attn_dropout, compile_model: our_recipe(config, attn_dropout, compile_model,  # noqa: E731
                                                          batch_size=args.batch_size)
    variants = [("original recipe (fp32, eager attention, dropout 0.1)", "fp32", lambda: original_recipe(config)),
                ("ours, all dropouts 0.1 (train.py default)", "bf16", lambda: ours(True, False)),
                ("ours, --no_attn_dropout", "bf16", lambda: ours(False, False))]
    if args.compile:
        variants.append(("ours, all dropouts 0.1, torch.compile", "bf16", lambda: ours(True, True)))
    baseline = None
    print(f"\n{args.model_config}, batch {args.batch_size} x {n_ctx}, {args.steps} timed steps each")
    print(f"{'variant':<58} {'tokens/s':>9} {'vs original':>12} {'MFU':>7}")
    for name, precision, make in variants:
        torch.manual_seed(0)
        model, step = make()
        tokens_per_s = measure(step, batch, args.steps)
        baseline = baseline or tokens_per_s
        mfu = tokens_per_s * flops_per_token(model) / peaks[precision]
        print(f"{name:<58} {tokens_per_s:>9,.0f} {tokens_per_s / baseline:>11.2f}x {100 * mfu:>6.1f}%")
        del model, step


if __name__ == "__main__":
    main()
