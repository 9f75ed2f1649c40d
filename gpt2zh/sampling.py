"""Sampling continuations: a batch at a time, KV cache always on, a sliding window past n_ctx."""
import copy
import time

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import kernel_trials
from .articles import ARTICLE_END
from .checkpoints import load_model_folder
from .devices import autocast_dtype
from .model import ATTENTION, context_length


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that writes each step into buffers allocated once for the whole window, where
    DynamicLayer concatenates (copies the whole cache) at every step.

    `dtype` overrides the model's: on CPU an fp32 cache is attended several times faster than a bf16 one
    (measured: 7.6 against 36-42 ms for 10 layers at 500 tokens).
    """

    def __init__(self, capacity, dtype=None):
        super().__init__()
        self.capacity, self.dtype = capacity, dtype

    def lazy_initialization(self, key_states, value_states):
        batch, heads, _, head_dim = key_states.shape  # [B, H, T, D]
        self.device = key_states.device
        self.key_buffer = torch.empty(batch, heads, self.capacity, head_dim, dtype=self.dtype or key_states.dtype,
                                      device=self.device)
        self.value_buffer = torch.empty_like(self.key_buffer)
        self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[2]
        end = start + key_states.shape[2]
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def pretend_filled(self, length):
        """Random keys and values for the first `length` positions, as if that many tokens came before (for timing
        a step at a given cache length without encoding a prefix)."""
        self.key_buffer[:, :, :length].normal_()
        self.value_buffer[:, :, :length].normal_()
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]


class PackedLinear(torch.nn.Module):
    """A frozen linear layer whose weight oneDNN reorders once for a few rows at a time (what
    torch.compile's freezing does on CPU): 1.6-2x faster than addmm for the 10 rows of a sampling step."""

    def __init__(self, weight, bias, rows):  # weight: [out, in]
        super().__init__()
        self.out_features = weight.shape[0]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)
        self.bias = bias.detach() if bias is not None else None

    def forward(self, x):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def pack_for_cpu_sampling(model, rows):
    """Replace the bf16 model's linear layers (GPT-2's Conv1D and the output layer) by PackedLinear,
    on CPUs where torch has oneDNN; elsewhere leave the model as it is. For sampling only: the
    packed weights are frozen."""
    from transformers.pytorch_utils import Conv1D

    weight = model.lm_head.weight
    if (weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available()
            or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return
    try:  # private oneDNN ops: a torch that changed them keeps the plain layers
        lm_head = PackedLinear(weight, None, rows)
        lm_head(torch.zeros(1, weight.shape[1], dtype=weight.dtype))
    except (RuntimeError, TypeError):
        return
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Conv1D):  # weight [in, out]
                setattr(parent, name, PackedLinear(child.weight.t(), child.bias, rows))
    model.lm_head = lm_head


def preallocated_cache(model, capacity):
    """A cache for `capacity` tokens, in the dtype the sampling kernel chose (`choose_kernel`); without a choice,
    fp32 on CPU when the model's attention accepts a cache in another dtype than its queries (ours does)."""
    device = next(model.parameters()).device
    fp32 = getattr(model.config, "sampling_cache_fp32",
                   device.type == "cpu" and model.config._attn_implementation == ATTENTION)
    return Cache(layers=[PreallocatedLayer(capacity, torch.float32 if fp32 else None)
                         for _ in range(model.config.n_layer)])


# ---- the sampling kernels, chosen by a short trial on the machine at hand ---------------------------------
# What is fastest differs between CPUs: on an AMD Zen 4 (no AMX) an fp32 cache attended by matmul-softmax-matmul
# ran 5x faster than SDPA over a bf16 cache; on an Intel Xeon with AMX the bf16 SDPA ran 3x faster.

def kernel_candidates(model):
    """{name: (fp32 cache, attention, packed linears)} for this model's weights: the cache in fp32 or in the
    weights' dtype, attended by matmul-softmax-matmul or SDPA, bf16 linear layers packed for oneDNN or not."""
    weights = next(model.parameters())
    native = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(weights.dtype)  # None: fp32 weights
    packable = weights.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
    candidates = {}
    for cache in ["fp32"] + ([native] if native else []):
        for attention in ("matmul", "sdpa"):
            for packed in ((False, True) if packable else (False,)):
                candidates[f"{cache}-{attention}" + ("+packed" if packed else "")] = (cache == "fp32", attention, packed)
    return candidates


def apply_kernel(model, kernel, rows):
    fp32_cache, attention, packed = kernel
    model.config.sampling_cache_fp32, model.config.sampling_attention = fp32_cache, attention
    if packed:
        pack_for_cpu_sampling(model, rows)


def time_step(model, rows, keys, steps=5):
    """Median seconds of one sampling step of `rows` tokens over a cache already holding `keys` tokens."""
    cache = preallocated_cache(model, keys + steps + 3)
    ids = torch.full((rows, 1), 5, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)  # allocates the buffers
        for layer in cache.layers:
            layer.pretend_filled(keys)
        times = []
        for _ in range(steps + 2):  # the first two warm the allocator and oneDNN's kernels up
            start = time.perf_counter()
            model(input_ids=ids, cache=cache, use_cache=True)
            times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2]


def measure_kernels(model, rows, keys):
    """Seconds a step of each candidate kernel, on copies of `model` (packing is one-way)."""
    timings = {}
    for name, kernel in kernel_candidates(model).items():
        trial = copy.deepcopy(model)
        apply_kernel(trial, kernel, rows)
        timings[name] = time_step(trial, rows, keys)
    return timings


def choose_kernel(model, rows, keys, forced="auto", say=print):
    """Apply the sampling kernel named by `forced`, or with "auto" the fastest on this machine: measured once
    on the model's shapes (`rows` samples, a cache of `keys` tokens) and remembered (kernel_trials)."""
    candidates = kernel_candidates(model)
    config, weights = model.config, next(model.parameters())
    shape = (f"{config.n_layer} layers x {config.n_embd} x {config.n_head} heads, vocab {config.vocab_size}, "
             f"{weights.dtype} | {rows} rows, {keys} cached tokens")
    chosen = kernel_trials.choose("sampling kernel", "--sampling_kernel", forced, candidates, shape,
                                  lambda: measure_kernels(model, rows, keys), "a step", say)
    apply_kernel(model, candidates[chosen], rows)
    return chosen


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


def draw(probs, generator=None):
    """One token id a row of `probs` [B, V], by inverse CDF: the first token whose cumulative probability
    passes a uniform draw (never a zero-probability one). torch.multinomial takes 2.7 ms for 10 x 13k on CPU;
    this 0.1 ms."""
    cdf = probs.cumsum(dim=-1)  # [B, V]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(model, prefix_ids, length, batch_size, processors, n_ctx, greedy=False, use_cache=True, generator=None,
           on_step=None, stop_id=None):
    """Continue `prefix_ids` by `length` tokens in `batch_size` independent draws.

    Returns a LongTensor [batch_size, len(prefix_ids) + length]. With the cache, each step feeds one
    token; when the cache would pass n_ctx, the last n_ctx // 2 tokens are encoded again and the
    continuation goes on from there (a sliding window). use_cache=False re-encodes the window every
    step, as the original did: the same tokens, far slower (a test checks they agree). `on_step` gets each step's
    new ids [B] and may raise to end sampling. With `stop_id`, sampling ends early once every row has produced it
    (rows are not cut: see `cut_at_stop`).
    """
    device = next(model.parameters()).device
    tokens = torch.tensor([prefix_ids] * batch_size, dtype=torch.long, device=device)  # [B, P]
    if tokens.shape[1] > n_ctx:
        window = tokens[:, -n_ctx:]
    else:
        window = tokens
    cache = None
    stopped = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for _ in range(length):
        if cache is None or not use_cache:
            out = model(input_ids=window, cache=preallocated_cache(model, n_ctx) if use_cache else None,
                        use_cache=use_cache, logits_to_keep=1)  # only the last position's logits are used
        else:
            out = model(input_ids=tokens[:, -1:], cache=cache, use_cache=True)
        cache = out.cache if use_cache else None
        scores = processors(tokens, out.logits[:, -1, :].float())  # [B, vocab]
        if greedy:
            next_ids = scores.argmax(dim=-1)
        else:
            next_ids = draw(torch.softmax(scores, dim=-1), generator)
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
    the sampling kernel `choose_kernel` picks, and the ids never to sample: [UNK], [PAD] and the rows a config's vocab_size reserves
    beyond the vocabulary, which name no token."""

    def __init__(self, model_path, tokenizer_path=None, device=torch.device("cpu"), precision="auto", rows=1,
                 kernel="auto", say=print):
        self.model, self.tokenizer = load_model_folder(model_path, tokenizer_path)
        self.model.to(device, dtype=autocast_dtype(device, precision, fp16=False) or torch.float32).eval()
        self.device, self.n_ctx = device, context_length(self.model.config)
        if device.type == "cpu":
            choose_kernel(self.model, rows, self.n_ctx // 2, kernel, say)
        self.suppress = [self.tokenizer.unk_token_id, self.tokenizer.pad_token_id,
                         *range(len(self.tokenizer), self.model.config.vocab_size)]

    def processors(self, temperature, top_k, top_p, repetition_penalty):
        return make_logits_processors(temperature, top_k, top_p, repetition_penalty, self.suppress)

    def write(self, prefix_ids, length, rows, processors, seed, stop_at_end=False, on_step=None):
        """`rows` continuations of `prefix_ids`, each a list of ids (cut at the end of an article with
        stop_at_end)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stop_id = self.tokenizer.convert_tokens_to_ids(ARTICLE_END) if stop_at_end else None
        out = sample(self.model, prefix_ids, length, rows, processors, self.n_ctx, generator=generator,
                     on_step=on_step, stop_id=stop_id).tolist()
        return [cut_at_stop(row, len(prefix_ids), stop_id) if stop_at_end else row for row in out]
