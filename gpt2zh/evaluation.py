"""Held-out loss: every token scored once, with up to n_ctx tokens of context (sliding windows)."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from .console import progress_bar


def eval_windows(length, n_ctx, stride):
    """(start, end, first scored position) of each window over a stream of `length` tokens.

    Windows start every `stride` tokens, but never after the first token still to be scored (which needs one
    token of context before it in the same window); each scores only the tokens no earlier window scored,
    so every token but the first is predicted exactly once.
    """
    windows, scored_until, start = [], 1, 0
    while scored_until < length:
        end = min(start + n_ctx, length)
        windows.append((start, end, scored_until))
        scored_until = end
        start = min(start + stride, scored_until - 1)
    return windows


@torch.no_grad()
def evaluate(model, ids, n_ctx, stride, batch_size, device, dtype, progress=True, pad_id=0, log_step=0):
    """Return (sum of negative log-likelihoods in nats, number of tokens scored) over the stream `ids`;
    with `log_step`, print the running loss every this many batches."""
    was_training = model.training
    model.eval()
    windows = eval_windows(len(ids), n_ctx, stride)
    total_nll, total_tokens = 0.0, 0
    bar = progress_bar(total=len(windows), desc="evaluating", unit="window", disable=not progress, leave=False)
    for first in range(0, len(windows), batch_size):
        batch = windows[first:first + batch_size]
        longest = max(end - start for start, end, _ in batch)
        input_ids = np.full((len(batch), longest), pad_id, dtype=np.int64)
        labels = np.full((len(batch), longest), -100, dtype=np.int64)
        for row, (start, end, scored_from) in enumerate(batch):
            input_ids[row, :end - start] = ids[start:end]
            labels[row, scored_from - start:end - start] = ids[scored_from:end]
        input_ids = torch.from_numpy(input_ids).to(device)
        labels = torch.from_numpy(labels).to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(input_ids=input_ids).logits  # [batch, T, vocab]
        # position t predicts token t+1
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                              ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((labels[:, 1:] != -100).sum())
        bar.set_postfix(loss=f"{total_nll / max(total_tokens, 1):.3f}", refresh=False)
        bar.update(len(batch))
        if log_step and (first // batch_size + 1) % log_step == 0:
            bar.write(f"batch {first // batch_size + 1}: {total_tokens:,} tokens, loss {total_nll / total_tokens:.4f}")
    bar.close()
    model.train(was_training)
    return total_nll, total_tokens


def summarize(total_nll, total_tokens, total_chars):
    loss = total_nll / total_tokens
    per_char = total_nll / total_chars
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens,
            "loss_per_char": per_char, "perplexity_per_char": math.exp(per_char), "characters": total_chars}
