"""Sampling continuations: a batch at a time, KV cache always on, a sliding window past n_ctx."""
import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from . import kernel_trials, native
from .articles import ARTICLE_END
from .checkpoints import load_model_folder
from .devices import autocast_dtype
from .errors import UserError
from .model import attention_scale, context_length, weight_out_in


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that writes each step into buffers allocated once for the whole window, where
    DynamicLayer concatenates (copies the whole cache) at every step.

    `dtype` overrides the model's (the sampling kernel's choice: on some CPUs an fp32 cache is attended several
    times faster than a bf16 one).
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
        self.rewind(length)

    def rewind(self, length):
        """Forget the positions from `length` on (the next update writes there)."""
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]


class PackedLinear:
    """x @ weight.T + bias with the weight reordered once by oneDNN for a few rows at a time (what torch.compile's
    freezing does on CPU): 1.6-2x faster than addmm for the 10 rows of a sampling step."""

    def __init__(self, weight, bias, rows):  # weight: [out, in]
        self.out_features = weight.shape[0]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)
        self.bias = bias.detach() if bias is not None else None

    def __call__(self, x):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


class HalfLinear:
    """x @ weight.T + bias through fp16 copies of the weights: PyTorch's fp16 matrix-vector kernel accumulates in
    fp32 and reads 29-35 GB/s on a Zen 4, where oneDNN's packed bf16 reads 20-23, so one row a step (a user at a
    terminal) runs faster; with several rows it falls back to a slow generic kernel."""

    def __init__(self, weight, bias):  # weight: [out, in]
        self.weight = weight.detach().to(torch.float16).contiguous()
        self.bias = bias.detach().to(torch.float16) if bias is not None else None

    def __call__(self, x):
        return F.linear(x.to(torch.float16), self.weight, self.bias)  # fp16 out: DecodeStep's stream is fp32


def linear_layer(weight, bias, kind, rows):
    """The kernel `kind` ("plain", "packed", "fp16") computing x @ weight.T + bias; weight [out, in]."""
    if kind == "packed":
        return PackedLinear(weight, bias, rows)
    if kind == "fp16":
        return HalfLinear(weight, bias)
    return functools.partial(F.linear, weight=weight.detach(), bias=bias.detach() if bias is not None else None)


# ---- attention of each row's newest token over the cache: query [B, H, D], keys/values [B, H, L, D] -> [B, H, D]

def attend_matmul(query, keys, values, scale):
    """matmul-softmax-matmul in the cache's dtype. The scores are keys @ query, a matrix-vector product over
    contiguous key rows (5-15% faster on CPU than query @ keys^T). It is also the GPU's: SDPA's cuDNN backend,
    torch's choice on Hopper, builds a new plan for every new key length (about 40 ms a step on an H200)."""
    scores = torch.matmul(keys, query.to(keys.dtype)[..., None])[..., 0] * scale  # [B, H, L]
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(values.dtype)
    return torch.matmul(probs[:, :, None], values)[:, :, 0]


def attend_sdpa(query, keys, values, scale):
    return F.scaled_dot_product_attention(query.to(keys.dtype)[:, :, None], keys, values, scale=scale)[:, :, 0]


def attend_fused(query, keys, values, scale):
    """Products and sums that torch.compile fuses into one pass over the keys and one over the values of a bf16
    cache, accumulating in fp32: about 19 GB/s for 10 rows on a Zen 4, where PyTorch's bf16 matmul reads such a
    cache at 9 and its SDPA at 4."""
    scores = (keys.float() * query.float()[:, :, None]).sum(-1) * scale  # [B, H, L]
    probs = torch.softmax(scores, dim=-1)
    return (probs[..., None] * values.float()).sum(-2)


@functools.cache
def compiled_fused_attention():
    return torch.compile(attend_fused, dynamic=True)  # one compilation for every batch and cache length


def attend_compiled(query, keys, values, scale):
    return compiled_fused_attention()(query.to(keys.dtype), keys, values, scale)  # one query dtype: one compilation


ATTENDS = {"matmul": attend_matmul, "sdpa": attend_sdpa, "fused": attend_compiled}
HALF_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # a cache in the weights' own half precision


@dataclass(frozen=True)
class SamplingKernel:
    cache: str  # "fp32", or the weights' "bf16" / "fp16"
    attention: str  # a key of ATTENDS, or "cpp": the whole step in C++ (native.py)
    linear: str  # "plain", "packed" (bf16 for oneDNN), "fp16", or "cpp" with the attention

    @property
    def name(self):
        if self.linear == "cpp":
            return f"{self.cache}-cpp"
        return f"{self.cache}-{self.attention}" + ("" if self.linear == "plain" else f"+{self.linear}")

    @property
    def cache_dtype(self):
        return torch.float32 if self.cache == "fp32" else None  # None: the weights' dtype


def default_kernel(model):
    """Without a trial (a GPU, or sample() called directly): a plain step, the cache in fp32 on CPU."""
    weights = next(model.parameters())
    cache = "fp32" if weights.device.type == "cpu" else HALF_NAMES.get(weights.dtype, "fp32")
    return SamplingKernel(cache, "matmul", "plain")


def decode_linears(model, kind, rows):
    """The model's linear layers as the kernel `kind` computes them: (c_attn, c_proj, c_fc, mlp c_proj) of each
    block, then the output layer."""
    def linear(layer):
        return linear_layer(weight_out_in(layer), layer.bias, kind, rows)

    blocks = [tuple(map(linear, (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)))
              for block in model.transformer.h]
    return blocks, linear(model.lm_head)


def decode_step(model, kernel=None, rows=1, linears=None):
    """The step computing `kernel`: the C++ one (native.py) or a DecodeStep."""
    if kernel is not None and kernel.linear == "cpp":
        return native.NativeDecodeStep(model, kernel)
    return DecodeStep(model, kernel, rows, linears)


class DecodeStep:
    """One sampling step of a GPT2LMHeadModel: each row's newest token through every layer, its key and value
    written into the cache the prefix's forward pass filled, the next token's logits out. The model's forward for
    one position, with the kernels of `kernel` and without transformers' per-module machinery (1.5 of the 12 ms
    a step of the seed config took on CPU). The model itself is not changed: packed or fp16 weights are copies
    (`linears`: decode_linears' for the kernel's kind, built if not given). With fp16 linear layers the residual
    stream is fp32 (their fp16 outputs add to it without a cast); otherwise it is in the weights' dtype."""

    def __init__(self, model, kernel=None, rows=1, linears=None):
        config = model.config
        self.kernel = kernel or default_kernel(model)
        self.heads = config.n_head
        self.attend = ATTENDS[self.kernel.attention]
        if self.kernel.attention == "fused":
            self.check_fused(model)
        self.dtype = torch.float32 if self.kernel.linear == "fp16" else next(model.parameters()).dtype
        block_linears, self.lm_head = linears or decode_linears(model, self.kernel.linear, rows)
        transformer = model.transformer
        self.wte, self.wpe = transformer.wte.weight, transformer.wpe.weight

        def layer_norm(module):  # called as F.layer_norm: a module call costs microseconds, 21 a step
            weight, bias = (p.detach().to(self.dtype) for p in (module.weight, module.bias))
            return functools.partial(F.layer_norm, normalized_shape=module.normalized_shape, weight=weight,
                                     bias=bias, eps=module.eps)

        self.ln_f = layer_norm(transformer.ln_f)
        self.blocks = []
        for index, (block, (c_attn, c_proj, c_fc, mlp_proj)) in enumerate(zip(transformer.h, block_linears)):
            self.blocks.append((layer_norm(block.ln_1), c_attn, c_proj, layer_norm(block.ln_2), c_fc,
                                block.mlp.act.forward, mlp_proj, attention_scale(config, index)))

    def check_fused(self, model):
        """Compile the fused attention now, on a small cache: where torch.compile cannot (no working C++
        compiler), say so instead of failing in the middle of sampling."""
        weights = next(model.parameters())
        keys = torch.zeros(1, self.heads, 2, model.config.n_embd // self.heads, dtype=weights.dtype,
                           device=weights.device)
        try:
            self.attend(keys[:, :, 0], keys, keys, 1.0)
        except Exception as error:  # noqa: BLE001 - compilers fail in many ways
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            raise UserError(f"sampling kernel {self.kernel.name}: torch.compile cannot build its fused attention here "
                            f"({type(error).__name__}: {first_line}); --sampling_kernel chooses another") from None

    @torch.no_grad()
    def __call__(self, ids, cache):
        """ids [B]: each row's newest token, at the position after the cache's; returns logits [B, vocab]."""
        rows = ids.shape[0]
        hidden = (self.wte[ids] + self.wpe[cache.get_seq_length()]).to(self.dtype)  # [B, C]
        for layer, (ln_1, c_attn, c_proj, ln_2, c_fc, act, mlp_proj, scale) in zip(cache.layers, self.blocks):
            query, key, value = c_attn(ln_1(hidden)).view(rows, 3, self.heads, -1).unbind(1)  # each [B, H, D]
            keys, values = layer.update(key[:, :, None], value[:, :, None])  # [B, H, L, D]
            hidden = hidden + c_proj(self.attend(query, keys, values, scale).to(self.dtype).reshape(rows, -1))
            hidden = hidden + mlp_proj(act(c_fc(ln_2(hidden))))
        return self.lm_head(self.ln_f(hidden))


def preallocated_cache(model, capacity, dtype=None):
    """A cache for `capacity` tokens in `dtype` (None: the weights')."""
    return Cache(layers=[PreallocatedLayer(capacity, dtype) for _ in range(model.config.n_layer)])


# ---- the sampling kernels, chosen by a short trial on the machine at hand ---------------------------------
# What is fastest differs between CPUs: on an AMD Zen 4 (no AMX) an fp32 cache attended by matmul-softmax-matmul
# ran 5x faster than SDPA over a bf16 cache; on an Intel Xeon with AMX the bf16 SDPA ran 3x faster.

def kernel_candidates(model):
    """{name: SamplingKernel} for this model's weights: the cache in fp32 or in the weights' dtype, attended by
    matmul-softmax-matmul, SDPA or (a half-precision cache) the compiled fused pass; the linear layers plain,
    packed for oneDNN (bf16 weights) or through fp16 copies; and (bf16 weights on the CPU) the whole step in C++."""
    weights = next(model.parameters())
    half = HALF_NAMES.get(weights.dtype)  # None: fp32 weights
    attentions = [("fp32", "matmul"), ("fp32", "sdpa")]
    if half:
        attentions += [(half, "matmul"), (half, "sdpa"), (half, "fused")]
    linears = ["plain"]
    if (weights.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):  # private oneDNN ops a later torch may change
        linears.append("packed")
    if weights.dtype != torch.float16:
        linears.append("fp16")
    kernels = [SamplingKernel(cache, attention, linear) for cache, attention in attentions for linear in linears]
    if native.supports(model):
        kernels.append(SamplingKernel("bf16", "cpp", "cpp"))
    return {kernel.name: kernel for kernel in kernels}


def rewind(cache, length):
    for layer in cache.layers:
        layer.rewind(length)


def measure_kernels(model, rows, keys, run_steps, rounds=3, steps=2):
    """{name: seconds a step} of every candidate kernel, stepping `rows` tokens over a cache already holding `keys`
    tokens, plus its set-up (compiling, copying weights; not the C++ build, kept per machine) spread over
    `run_steps` steps. The candidates take turns for `rounds` rounds of `steps` steps and each keeps its fastest
    step: on a shared machine a neighbour's burst of work slows whatever runs at that moment, often for seconds.
    Candidates share the copies of the weights of their kind of linear layers and the cache of their dtype, rewound
    to `keys` tokens after every step."""
    candidates = kernel_candidates(model)
    ids = torch.full((rows,), 5, dtype=torch.long, device=next(model.parameters()).device)
    if any(kernel.linear == "cpp" for kernel in candidates.values()):
        try:  # built once per machine and kept, so not a set-up cost of each run
            native.library()
        except UserError:
            pass  # the candidate fails below and is left out
    linears, caches, entrants = {}, {}, {}
    for name, kernel in candidates.items():
        start = time.perf_counter()
        try:
            if kernel.linear not in linears and kernel.linear != "cpp":
                linears[kernel.linear] = decode_linears(model, kernel.linear, rows)
            step = decode_step(model, kernel, rows, linears.get(kernel.linear))
            cache = caches.get(kernel.cache)
            if cache is None:
                cache = caches[kernel.cache] = preallocated_cache(model, keys + 1, kernel.cache_dtype)
                step(ids, cache)  # allocates the buffers
                for layer in cache.layers:
                    layer.pretend_filled(keys)
            for _ in range(2):  # builds what the kernel builds on its first call (compiles), warms oneDNN up
                step(ids, cache)
                rewind(cache, keys)
        except Exception:  # noqa: BLE001 - torch.compile fails in many ways where no C++ compiler works
            continue
        entrants[name] = (step, caches[kernel.cache], time.perf_counter() - start)
    best = dict.fromkeys(entrants, float("inf"))
    for _ in range(rounds):
        for name, (step, cache, _) in entrants.items():
            for _ in range(steps):
                start = time.perf_counter()
                step(ids, cache)
                best[name] = min(best[name], time.perf_counter() - start)
                rewind(cache, keys)
    return {name: best[name] + max(setup - 2 * best[name], 0.0) / run_steps
            for name, (_, _, setup) in entrants.items()}


def choose_kernel(model, rows, keys, forced="auto", say=print):
    """The sampling kernel `forced` names, or with "auto" the fastest on this machine: measured once on the
    model's shapes (`rows` samples, a cache of `keys` tokens; set-up costs spread over a window of n_ctx steps) and
    remembered (kernel_trials)."""
    candidates = kernel_candidates(model)
    config, weights = model.config, next(model.parameters())
    shape = (f"{config.n_layer} layers x {config.n_embd} x {config.n_head} heads, vocab {config.vocab_size}, "
             f"{weights.dtype} | {rows} rows, {keys} cached tokens")
    chosen = kernel_trials.choose("sampling kernel", "--sampling_kernel", forced, candidates, shape,
                                  lambda: measure_kernels(model, rows, keys, context_length(config)), "a step", say)
    return candidates[chosen]


def make_logits_processors(temperature, top_k, top_p, repetition_penalty, suppress_ids):
    """transformers' processors in its own order: penalties and bans first, then the warpers."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

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
           on_step=None, stop_id=None, step=None):
    """Continue `prefix_ids` by `length` tokens in `batch_size` independent draws.

    Returns a LongTensor [batch_size, len(prefix_ids) + length]. With the cache, the model's forward encodes the
    prefix and `step` (a DecodeStep; by default a plain one) feeds one token at a time; when the cache would pass
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
    for _ in range(length):
        if cache is not None:
            logits = step(tokens[:, -1], cache)  # [B, vocab]
        else:
            cache = preallocated_cache(model, n_ctx, step.kernel.cache_dtype) if use_cache else None
            logits = model(input_ids=window, cache=cache, use_cache=use_cache,
                           logits_to_keep=1).logits[:, -1]  # only the last position's logits are used
        scores = processors(tokens, logits.float())  # [B, vocab]
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
    for each number of rows the sampling kernel `choose_kernel` picks (the one for `rows` chosen at once), and the
    ids never to sample: [UNK], [PAD] and the rows a config's vocab_size reserves beyond the vocabulary, which name
    no token."""

    def __init__(self, model_path, tokenizer_path=None, device=torch.device("cpu"), precision="auto", rows=1,
                 kernel="auto", say=print):
        self.model, self.tokenizer = load_model_folder(model_path, tokenizer_path)
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
            chosen = (choose_kernel(self.model, rows, self.n_ctx // 2, self.kernel, self.say)
                      if self.device.type == "cpu" else None)
            # the C++ step takes any number of rows: one copy of its packed weights serves them all
            shared = [step for step in self.steps.values() if step.kernel == chosen]
            if chosen and chosen.linear == "cpp" and shared:
                self.steps[rows] = shared[0]
            else:
                self.steps[rows] = decode_step(self.model, chosen, rows)
        return self.steps[rows]

    def processors(self, temperature, top_k, top_p, repetition_penalty):
        return make_logits_processors(temperature, top_k, top_p, repetition_penalty, self.suppress)

    def write(self, prefix_ids, length, rows, processors, seed, stop_at_end=False, on_step=None):
        """`rows` continuations of `prefix_ids`, each a list of ids (cut at the end of an article with
        stop_at_end)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stop_id = self.tokenizer.convert_tokens_to_ids(ARTICLE_END) if stop_at_end else None
        out = sample(self.model, prefix_ids, length, rows, processors, self.n_ctx, generator=generator,
                     on_step=on_step, stop_id=stop_id, step=self.decode_step(rows)).tolist()
        return [cut_at_stop(row, len(prefix_ids), stop_id) if stop_at_end else row for row in out]
