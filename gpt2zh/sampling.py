"""Sampling continuations: a batch at a time, KV cache always on, a sliding window past n_ctx."""
import contextlib

import torch

from . import native_build
from .articles import ARTICLE_END
from .checkpoints import open_model_folder
from .decoding import DecodeStep, choose_kernel, decode_step, preallocated_cache
from .devices import autocast_dtype
from .inference import encode_tokens, load_sampling_model
from .model import context_length

CPU = torch.device("cpu")


class Processors(list):
    """Logits processors applied in order. transformers' LogitsProcessorList inspects every processor's signature on
    every call: 0.17 ms of a 7 ms sampling step."""

    def __call__(self, input_ids, scores):  # [B, T], [B, V]
        for processor in self:
            scores = processor(input_ids, scores)
        return scores

    def draw(self, input_ids, scores, generator=None):
        """The next token of each row [B]: drawn from the softmax of the processed scores. A chain that ends in TopK
        draws from its k tokens alone (TopK.draw): for ten rows of the seed's 13k vocabulary, masking the rest and
        drawing from the whole rows took 0.67-0.75 ms a step of a run (0.39-0.49 now); one row's 0.2 ms, unchanged,
        is the ~12 small torch ops' own cost between C++ steps."""
        if self and isinstance(self[-1], TopK):
            return self[-1].draw(Processors(self[:-1])(input_ids, scores), generator)
        return draw(torch.softmax(self(input_ids, scores), dim=-1), generator)


class SuppressIds:
    """Ids never to sample, their scores set to -inf. transformers' SuppressTokensLogitsProcessor looks the vocabulary
    up in them with torch.isin on every call: 0.26 ms a step for 13k tokens; the index is made once here."""

    def __init__(self, ids):
        self.ids, self.index = list(ids), None

    def __call__(self, input_ids, scores):
        if self.index is None or self.index.device != scores.device:
            self.index = torch.tensor(self.ids, dtype=torch.long, device=scores.device)
        return scores.index_fill(1, self.index, float("-inf"))


def make_logits_processors(temperature, top_k, top_p, repetition_penalty, suppress_ids, repetition_window=0):
    """The logits processors of these settings in transformers' order: penalties and bans first, then the warpers."""
    processors = Processors()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(repetition_penalty, repetition_window))
    if suppress_ids:
        processors.append(SuppressIds(suppress_ids))
    if temperature != 1.0:
        processors.append(lambda input_ids, scores: scores / temperature)
    if top_k > 0:
        processors.append(TopK(top_k))
    if 0 < top_p < 1:
        processors.append(TopP(top_p))
    return processors


# transformers' RepetitionPenaltyLogitsProcessor, TopKLogitsWarper and TopPLogitsWarper compute the same (a test holds
# them side by side); importing transformers.generation costs a second of generate.py's start.

class RepetitionPenalty:
    """CTRL's penalty on the tokens already in a row, sign-aware: a score below 0 times `penalty`, else divided by
    it. With a `window`, only the row's last `window` tokens count (llama.cpp's repeat_last_n): a small model's
    stutter (哥哥哥哥) is stopped where it starts, and the words a novel uses again and again are not pushed aside
    for the rest of the text."""

    def __init__(self, penalty, window=0):
        self.penalty, self.window = penalty, window

    def __call__(self, input_ids, scores):  # [B, T], [B, V]
        if self.window:
            input_ids = input_ids[:, -self.window:]
        score = scores.gather(1, input_ids)
        return scores.scatter(1, input_ids, torch.where(score < 0, score * self.penalty, score / self.penalty))


class TopK:
    """Only the k highest scores of a row (and any tied with the k-th) kept."""

    def __init__(self, k):
        self.k = k

    def __call__(self, input_ids, scores):
        kth = scores.topk(min(self.k, scores.shape[-1]))[0][:, -1:]  # [B, 1]
        return scores.masked_fill(scores < kth, float("-inf"))

    def draw(self, scores, generator=None):
        """One token of each row's k highest scores [B, V], drawn as draw() draws from the whole row with the others
        masked (the kept tokens in vocabulary order: the same token for the same uniform number); of tokens tied
        with the k-th, torch.topk's are kept."""
        values, ids = scores.topk(min(self.k, scores.shape[-1]))  # [B, k], highest first
        order = ids.argsort(dim=-1)  # the kept tokens in vocabulary order
        ids, values = ids.gather(1, order), values.gather(1, order)
        return ids.gather(1, draw(torch.softmax(values, dim=-1), generator)[:, None])[:, 0]


class TopP:
    """Nucleus sampling: the fewest most likely tokens whose probability reaches `p` kept (the most likely always)."""

    def __init__(self, p):
        self.p = p

    def __call__(self, input_ids, scores):
        ascending, order = scores.sort()  # [B, V]
        dropped = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.p
        dropped[:, -1] = False
        return scores.masked_fill(dropped.scatter(1, order, dropped), float("-inf"))


class OccurrencePenalty:
    """OpenAI's presence and frequency penalties: each token's logit lowered by `presence` once it occurred in the
    completion and by `frequency` for every time it did (the tokens after `prefix_length`)."""

    def __init__(self, presence, frequency, prefix_length):
        self.presence, self.frequency, self.prefix_length = presence, frequency, prefix_length

    def __call__(self, input_ids, scores):  # [B, T], [B, V]
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, input_ids[:, self.prefix_length:], torch.ones_like(scores[:, :1]).expand(
            -1, input_ids.shape[1] - self.prefix_length))
        return scores - self.frequency * counts - self.presence * (counts > 0)


def draw(probs, generator=None):
    """One token id a row of `probs` [B, V], by inverse CDF: the first token whose cumulative probability
    passes a uniform draw (never a zero-probability one). torch.multinomial takes 2.7 ms for 10 x 13k on CPU;
    this 0.1 ms."""
    cdf = probs.cumsum(dim=-1)  # [B, V]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(model, prefix_ids, length, batch_size, processors, n_ctx, greedy=False, use_cache=True, generator=None,
           on_step=None, stop_id=None, step=None):
    """Continue `prefix_ids` by `length` tokens in `batch_size` independent draws, each step's scores processed and
    drawn from by `processors` (a Processors: make_logits_processors').

    Returns a LongTensor [batch_size, len(prefix_ids) + length]. With the cache, encode_tokens encodes the prefix
    and `step` (a DecodeStep; by default a plain one) feeds one token at a time; when the cache would pass
    n_ctx, the last n_ctx // 2 tokens are encoded again and the continuation goes on from there (a sliding
    window). use_cache=False re-encodes the window every step, as the original did: the same tokens, far slower
    (a test checks they agree). `on_step` gets each step's new ids [B] and may raise to end sampling. With
    `stop_id`, sampling ends early once every row has produced it (rows are not cut: see `cut_at_stop`).
    """
    device = next(model.parameters()).device
    step = step or DecodeStep(model, rows=batch_size)
    tokens = torch.tensor([prefix_ids] * batch_size, dtype=torch.long, device=device)  # [B, P]
    window = tokens[:, -n_ctx:]
    cache = None
    stopped = torch.zeros(batch_size, dtype=torch.bool, device=device)
    with getattr(step, "threads", contextlib.nullcontext()):  # torch's ops on the C++ step's thread count
        for _ in range(length):
            if cache is not None:
                logits = step(tokens[:, -1], cache)  # [B, vocab]
            else:
                cache = preallocated_cache(model, n_ctx if use_cache else window.shape[1], step.kernel.cache_dtype)
                logits = encode_tokens(model, window, cache)
                cache = cache if use_cache else None
            if greedy:
                next_ids = processors(tokens, logits.float()).argmax(dim=-1)  # [B]
            else:
                next_ids = processors.draw(tokens, logits.float(), generator)
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            if on_step:
                on_step(next_ids)
            if stop_id is not None:
                stopped |= next_ids == stop_id
                if bool(stopped.all()):
                    break
            if cache is not None and cache.get_seq_length() + 1 > n_ctx:
                cache = None  # slide: the next step re-encodes the most recent half window
                window = tokens[:, -(n_ctx // 2):]
            elif not use_cache:
                window = tokens[:, -n_ctx:]
    return tokens


def cut_at_stop(row, prefix_length, stop_id):
    """A sampled row up to and including the first `stop_id` after the prefix (all of it if there is none)."""
    for i in range(prefix_length, len(row)):
        if row[i] == stop_id:
            return row[:i + 1]
    return row


class Writer:
    """A model folder loaded once for continuing prefixes: weights in the precision the hardware suits, on CPU
    for each number of rows the sampling kernel `choose_kernel` picks (the one for `rows` chosen at once), and the
    ids never to sample: [UNK], [PAD] and the rows a config's vocab_size reserves beyond the vocabulary, which name
    no token."""

    def __init__(self, model_path, tokenizer_path=None, device=CPU, precision="auto", rows=1,
                 kernel="auto", say=print):
        if device.type == "cpu" and (kernel == "auto" or kernel.endswith("-cpp")):
            native_build.start_building()  # the compiler runs on another core while the model loads
        config, self.tokenizer = open_model_folder(model_path, tokenizer_path, sampling=True)
        self.model = load_sampling_model(model_path, config)
        self.model.to(device, dtype=autocast_dtype(device, precision, fp16=False) or torch.float32).eval()
        self.device, self.n_ctx = device, context_length(self.model.config)
        self.kernel, self.say, self.steps = kernel, say, {}
        self.decode_step(rows)
        self.suppress = [self.tokenizer.unk_token_id, self.tokenizer.pad_token_id,
                         *range(len(self.tokenizer), self.model.config.vocab_size)]

    def decode_step(self, rows):
        """The DecodeStep for `rows` rows at a time: what is fastest for one row (fp16 linear layers on a Zen 4)
        is the slowest for ten."""
        if rows not in self.steps:
            prepared = {}  # a trial's steps: the chosen one is used, not packed again
            chosen = (choose_kernel(self.model, rows, self.n_ctx // 2, self.kernel, self.say, prepared)
                      if self.device.type == "cpu" else None)
            # the C++ step takes any number of rows: one copy of its packed weights serves them all
            shared = [step for step in self.steps.values() if step.kernel == chosen]
            if chosen and chosen.attention == "cpp" and shared:
                self.steps[rows] = shared[0]
            elif chosen and chosen.name in prepared:
                self.steps[rows] = prepared[chosen.name]
            else:
                self.steps[rows] = decode_step(self.model, chosen, rows)
        return self.steps[rows]

    def processors(self, temperature, top_k, top_p, repetition_penalty, presence_penalty=0.0, frequency_penalty=0.0,
                   prefix_length=0, repetition_window=0):
        """The logits processors of these settings (the OpenAI penalties count the tokens after `prefix_length`)."""
        processors = make_logits_processors(temperature, top_k, top_p, repetition_penalty, self.suppress,
                                            repetition_window=repetition_window)
        if presence_penalty or frequency_penalty:
            processors.insert(0, OccurrencePenalty(presence_penalty, frequency_penalty, prefix_length))
        return processors

    def write(self, prefix_ids, length, rows, processors, seed, stop_at_end=False, on_step=None, greedy=False):
        """`rows` continuations of `prefix_ids`, each a list of ids (cut at the end of an article with
        stop_at_end); `greedy`: the most likely token each step."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stop_id = self.tokenizer.convert_tokens_to_ids(ARTICLE_END) if stop_at_end else None
        out = sample(self.model, prefix_ids, length, rows, processors, self.n_ctx, greedy=greedy, generator=generator,
                     on_step=on_step, stop_id=stop_id, step=self.decode_step(rows)).tolist()
        return [cut_at_stop(row, len(prefix_ids), stop_id) if stop_at_end else row for row in out]
