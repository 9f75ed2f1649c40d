"""Sampling continuations: a batch at a time, KV cache always on, a sliding window past n_ctx."""
import re

import torch


def make_logits_processors(temperature, top_k, top_p, repetition_penalty, suppress_ids):
    """transformers' processors in its own order: penalties and bans first, then the warpers."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, SuppressTokensLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))  # CTRL's, sign-aware
    if suppress_ids:
        processors.append(SuppressTokensLogitsProcessor(suppress_ids))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        processors.append(TopKLogitsWarper(top_k))
    if 0 < top_p < 1:
        processors.append(TopPLogitsWarper(top_p))
    return processors


@torch.no_grad()
def sample(model, prefix_ids, length, batch_size, processors, n_ctx, greedy=False, use_cache=True, generator=None,
           on_step=None):
    """Continue `prefix_ids` by `length` tokens in `batch_size` independent draws.

    Returns a LongTensor [batch_size, len(prefix_ids) + length]. With the cache, each step feeds one
    token; when the cache would pass n_ctx, the last n_ctx // 2 tokens are encoded again and the
    continuation goes on from there (a sliding window). use_cache=False re-encodes the window every
    step, as the original did: the same tokens, far slower (a test checks they agree).
    """
    device = next(model.parameters()).device
    tokens = torch.tensor([prefix_ids] * batch_size, dtype=torch.long, device=device)  # [B, P]
    if tokens.shape[1] > n_ctx:
        window = tokens[:, -n_ctx:]
    else:
        window = tokens
    cache = None
    for _ in range(length):
        if cache is None or not use_cache:
            out = model(input_ids=window, use_cache=use_cache)
        else:
            out = model(input_ids=tokens[:, -1:], cache=cache, use_cache=True)
        cache = out.cache if use_cache else None
        scores = processors(tokens, out.logits[:, -1, :].float())  # [B, vocab]
        if greedy:
            next_ids = scores.argmax(dim=-1)
        else:
            next_ids = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        if on_step:
            on_step()
        if cache is not None and cache.get_seq_length() + 1 > n_ctx:
            cache = None  # slide: the next step re-encodes the most recent half window
            window = tokens[:, -(n_ctx // 2):]
        elif not use_cache:
            window = tokens[:, -n_ctx:]
    return tokens


def is_word(token):
    return re.fullmatch(r"[a-z]+", token) is not None


def ids_to_text(tokenizer, ids):
    """The original's output format: [CLS] a blank line, [SEP] a newline, [MASK] dropped, ## joined,
    a space kept between English words."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    pieces = []
    for i, token in enumerate(tokens):
        if token == "[MASK]":
            pieces.append("")
        elif token == "[CLS]":
            pieces.append("\n\n")
        elif token == "[SEP]":
            pieces.append("\n")
        elif i + 1 < len(tokens) and is_word(token.removeprefix("##")) and is_word(tokens[i + 1]):
            pieces.append(token + " ")
        else:
            pieces.append(token)
    return "".join(pieces).replace("##", "").strip()
