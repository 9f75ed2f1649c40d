"""Held-out loss through the sampling kernels themselves: what int8 (or bf16) weights cost a trained model.

Each held-out window (train.py's: n_ctx tokens every n_ctx // 2, each token scored once) is fed token by token
through a kernel's decode step, as generation feeds it, and every scored token's log-likelihood is summed; "forward"
is the model's own fp32 forward pass over the same windows (eval.py's number). Reports nats per character.
Run from the project root after the preset (its model folder and held-out pieces):
    python bench/kernel_quality.py --model model/cpu_preset/final_model --pieces data/cpu_preset/tokenized_eval
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402

from gpt2zh.checkpoints import load_model_folder  # noqa: E402
from gpt2zh.decoding import decode_step, kernel_candidates, preallocated_cache  # noqa: E402
from gpt2zh.evaluation import eval_windows, evaluate  # noqa: E402
from gpt2zh.model import context_length, quiet_transformers  # noqa: E402
from gpt2zh.pieces import MANIFEST, load_pieces  # noqa: E402


@torch.no_grad()
def stepped_nll(model, kernel, ids, windows, rows):
    """The summed negative log-likelihood of the windows' scored tokens, fed one position at a time through the
    kernel's step, `rows` windows of one length side by side."""
    step, total = decode_step(model, kernel, rows), 0.0
    by_length = {}
    for window in windows:
        by_length.setdefault(window[1] - window[0], []).append(window)
    for length, same in by_length.items():
        for first in range(0, len(same), rows):
            batch = same[first:first + rows]
            tokens = torch.tensor(np.stack([ids[start:end] for start, end, _ in batch]))  # [B, length]
            cache = preallocated_cache(model, length, kernel.cache_dtype)
            step_of_batch = step if len(batch) == rows else decode_step(model, kernel, len(batch))
            for t in range(length - 1):
                logits = step_of_batch(tokens[:, t], cache)  # [B, vocab]: predicts position t + 1
                nll = F.cross_entropy(logits.float(), tokens[:, t + 1], reduction="none")
                scored = torch.tensor([start + t + 1 >= scored_from for start, _, scored_from in batch])
                total += nll[scored].sum().item()
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model folder")
    p.add_argument("--pieces", required=True, help="the held-out tokenized pieces (a tokenized_eval folder)")
    p.add_argument("--kernels", default="forward,bf16-cpp,int8-cpp", help="forward and/or sampling kernel names")
    p.add_argument("--rows", type=int, default=16, help="windows stepped side by side")
    args = p.parse_args()
    quiet_transformers()
    print(machine())
    model, _ = load_model_folder(args.model, None, "--model")
    model.eval()
    manifest = json.loads((Path(args.pieces) / MANIFEST).read_text(encoding="utf-8"))
    ids = np.concatenate([np.asarray(piece, dtype=np.int64) for piece in load_pieces(args.pieces, manifest)])
    n_ctx = context_length(model.config)
    windows = eval_windows(len(ids), n_ctx, n_ctx // 2)
    candidates = kernel_candidates(model)
    print(f"{args.model}: {len(ids):,} held-out tokens, {manifest['characters']:,} characters, {len(windows)} windows "
          f"of {n_ctx}")
    for name in args.kernels.split(","):
        start = time.perf_counter()
        if name == "forward":
            nll, _ = evaluate(model, ids, n_ctx, n_ctx // 2, 8, torch.device("cpu"), None, progress=False)
        else:
            nll = stepped_nll(model, candidates[name], ids, windows, args.rows)
        print(f"{name:>10}: {nll / manifest['characters']:.4f} nats/char ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
