"""One sampling step after the prefix: every row's newest token through the model with its KV cache, by the
kernel a short trial found fastest on this machine (what is fastest differs between CPUs and numbers of rows)."""
import functools
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernel_trials, native, native_build
from .cpu import cpu_features
from .devices import bf16_supported
from .errors import UserError
from .model import attention_scale, context_length, weight_out_in


class PreallocatedCache:
    """The model's KV cache, a PreallocatedLayer a layer, read as transformers' Cache is (`layers`,
    `get_seq_length`): only our forward passes use it (encode_tokens, the decode steps), and importing transformers
    costs a second of generate.py's start."""

    def __init__(self, layers):
        self.layers = layers
        self.pointers = None  # the C++ step's pointers to the layers' buffers (native.NativeDecodeStep.buffers)

    def get_seq_length(self):
        return self.layers[0].length


class PreallocatedLayer:
    """A layer's cache that writes each step into buffers allocated once for the whole window, where transformers'
    DynamicLayer concatenates (copies the whole cache) at every step; the buffers are made on the first update.

    `dtype` overrides the model's (the sampling kernel's choice: on some CPUs an fp32 cache is attended several
    times faster than a bf16 one).
    """

    def __init__(self, capacity, dtype=None):
        self.capacity, self.dtype, self.is_initialized = capacity, dtype, False
        self.length = 0  # positions filled: a number, as the C++ step moves it on ten layers every step

    def lazy_initialization(self, key_states, value_states):
        batch, heads, _, head_dim = key_states.shape  # [B, H, T, D]
        self.device = key_states.device
        self.key_buffer = torch.empty(batch, heads, self.capacity, head_dim, dtype=self.dtype or key_states.dtype,
                                      device=self.device)
        self.value_buffer = torch.empty_like(self.key_buffer)
        self.is_initialized = True

    def update(self, key_states, value_states):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.length
        self.store(start, key_states, value_states)
        self.rewind(start + key_states.shape[2])
        return self.attended(key_states.dtype)

    def store(self, start, keys, values):
        """keys and values [B, H, T, D] (or [T, D], the same for every row and head) at positions start.."""
        end = start + keys.shape[-2]
        self.key_buffer[:, :, start:end], self.value_buffer[:, :, start:end] = keys, values

    def attended(self, dtype):
        """The keys and values the forward pass attends to: the filled positions as stored."""
        return self.keys, self.values

    def pretend_filled(self, length):
        """Random keys and values for the first `length` positions, as if that many tokens came before (for timing
        a step at a given cache length without encoding a prefix): the same for every row and head, as drawing them
        all took seconds for ten rows of a bf16 cache."""
        head_dim = self.key_buffer.shape[-1]
        self.store(0, torch.randn(length, head_dim), torch.randn(length, head_dim))  # [L, D] into every [B, H]
        self.rewind(length)

    def rewind(self, length):
        """Forget the positions from `length` on (the next update writes there)."""
        self.length = length

    @property
    def keys(self):  # [B, H, length, D]
        return self.key_buffer[:, :, :self.length]

    @property
    def values(self):
        return self.value_buffer[:, :, :self.length]


class QuantizedLayer(PreallocatedLayer):
    """A PreallocatedLayer of int8 keys and values, each head's at each position with its own scale (its largest
    magnitude at 127), as int8-cpp reads and writes them: half the bytes of a bf16 cache, and held-out loss unchanged
    to 1e-4 (docs/BENCHMARKS.md). The forward pass over a prefix attends to what is stored, dequantized."""

    def __init__(self, capacity):
        super().__init__(capacity, torch.int8)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.key_scales = torch.empty(self.key_buffer.shape[:3], device=self.device)  # [B, H, capacity]
        self.value_scales = torch.empty_like(self.key_scales)

    def store(self, start, keys, values):
        keys, key_scale = native.quantized(keys, 127)  # levels [..., T, D], scales [..., T, 1]
        values, value_scale = native.quantized(values, 127)
        super().store(start, keys, values)
        end = start + keys.shape[-2]
        self.key_scales[:, :, start:end], self.value_scales[:, :, start:end] = key_scale[..., 0], value_scale[..., 0]

    def attended(self, dtype):
        end = self.length
        return tuple((levels * scales[:, :, :end, None]).to(dtype)
                     for levels, scales in ((self.keys, self.key_scales), (self.values, self.value_scales)))


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


ATTENDS = {"matmul": attend_matmul, "sdpa": attend_sdpa}
HALF_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # a cache in the weights' own half precision
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


@dataclass(frozen=True)
class SamplingKernel:
    cache: str  # "fp32", the weights' "bf16" / "fp16", or "int8" (QuantizedLayer)
    attention: str  # a key of ATTENDS, or "cpp": the whole step in C++ (native.py)
    linear: str  # "plain", "packed" (bf16 for oneDNN), "fp16"; with "cpp" the weights it streams: "bf16" or "int8"

    @property
    def name(self):
        if self.attention == "cpp":
            return f"{self.linear}-cpp"
        return f"{self.cache}-{self.attention}" + ("" if self.linear == "plain" else f"+{self.linear}")

    @property
    def cache_dtype(self):
        return CACHE_DTYPES[self.cache]


def default_kernel(model):
    """Without a trial (a GPU, or sample() called directly): a plain step, the cache in fp32 on CPU."""
    weights = next(model.parameters())
    cache = "fp32" if weights.device.type == "cpu" else HALF_NAMES.get(weights.dtype, "fp32")
    return SamplingKernel(cache, "matmul", "plain")


def decode_linears(model, kind, rows):
    """The model's linear layers as the kernel `kind` computes them: (c_attn, c_proj, c_fc, mlp c_proj) of each
    block, then the output layer."""
    blocks = [tuple(linear_layer(weight_out_in(layer), layer.bias, kind, rows)
                    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj))
              for block in model.transformer.h]
    return blocks, linear_layer(weight_out_in(model.lm_head), model.lm_head.bias, kind, rows)


def layer_norm(module, dtype):
    """`module` as a call of F.layer_norm in `dtype`: a module call costs microseconds, 21 a step."""
    weight, bias = (p.detach().to(dtype) for p in (module.weight, module.bias))
    return functools.partial(F.layer_norm, normalized_shape=module.normalized_shape, weight=weight, bias=bias,
                             eps=module.eps)


def decode_step(model, kernel=None, rows=1, linears=None):
    """The step computing `kernel`: the C++ one (native.py) or a DecodeStep."""
    if kernel is not None and kernel.attention == "cpp":
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
        self.dtype = torch.float32 if self.kernel.linear == "fp16" else next(model.parameters()).dtype
        block_linears, self.lm_head = linears or decode_linears(model, self.kernel.linear, rows)
        transformer = model.transformer
        self.wte, self.wpe = transformer.wte.weight, transformer.wpe.weight
        self.ln_f = layer_norm(transformer.ln_f, self.dtype)
        self.blocks = []
        for index, (block, (c_attn, c_proj, c_fc, mlp_proj)) in enumerate(zip(transformer.h, block_linears,
                                                                              strict=True)):
            self.blocks.append((layer_norm(block.ln_1, self.dtype), c_attn, c_proj, layer_norm(block.ln_2, self.dtype),
                                c_fc, block.mlp.act.forward, mlp_proj, attention_scale(config, index)))

    @torch.no_grad()
    def __call__(self, ids, cache):
        """ids [B]: each row's newest token, at the position after the cache's; returns logits [B, vocab]."""
        rows = ids.shape[0]
        hidden = (self.wte[ids] + self.wpe[cache.get_seq_length()]).to(self.dtype)  # [B, C]
        for layer, (ln_1, c_attn, c_proj, ln_2, c_fc, act, mlp_proj, scale) in zip(cache.layers, self.blocks,
                                                                                  strict=True):
            query, key, value = c_attn(ln_1(hidden)).view(rows, 3, self.heads, -1).unbind(1)  # each [B, H, D]
            keys, values = layer.update(key[:, :, None], value[:, :, None])  # [B, H, L, D]
            hidden = hidden + c_proj(self.attend(query, keys, values, scale).to(self.dtype).reshape(rows, -1))
            hidden = hidden + mlp_proj(act(c_fc(ln_2(hidden))))
        return self.lm_head(self.ln_f(hidden))


def preallocated_cache(model, capacity, dtype=None):
    """A cache for `capacity` tokens in `dtype` (None: the weights'; torch.int8: QuantizedLayer's)."""
    if dtype == torch.int8:
        return PreallocatedCache([QuantizedLayer(capacity) for _ in range(model.config.n_layer)])
    return PreallocatedCache([PreallocatedLayer(capacity, dtype) for _ in range(model.config.n_layer)])


# ---- the sampling kernels, chosen by a short trial on the machine at hand ---------------------------------
# Only kernels that were the fastest somewhere stay; where each wins, by how much over the runner-up, is in
# docs/BENCHMARKS.md ("Sampling kernels"). Without a working C++ compiler (Windows without one on PATH, say)
# the trial chooses among the others.
CANDIDATES = (
    SamplingKernel("bf16", "cpp", "bf16"),  # AMD Zen 4 (AVX512-BF16): the smallest model (2 x 64), 2 and 10 rows
    SamplingKernel("int8", "cpp", "int8"),  # Zen 3 and Zen 4: 1 and 10 rows, larger models
    SamplingKernel("fp32", "sdpa", "plain"),  # Zen 3 without a compiler: 10 rows (fp32 weights)
    SamplingKernel("fp32", "sdpa", "fp16"),  # Zen 3 and Zen 4 without a compiler: 1 row
    SamplingKernel("fp32", "sdpa", "packed"),  # Zen 4 without a compiler: 10 rows (bf16 weights)
    SamplingKernel("bf16", "sdpa", "packed"),  # Intel Xeon with AMX: bf16 SDPA 3x the fp32 one (issue 11)
)
# 1.5-6x slower than the C++ step wherever it was measured in AVX2 or AVX-512 intrinsics (Zen 3, Zen 4): timed only
# where it is not (no compiler, or the compiler's portable vectors: ARM)
BEHIND_THE_CPP_STEP = frozenset({"fp32-sdpa", "fp32-sdpa+fp16", "fp32-sdpa+packed"})
# slower than int8-cpp in every trial on the Zen 3 (1.2-2.6x; models of 4 x 128 to 10 x 768, 1 to 10 rows): where
# the C++ step is in AVX2 (bf16 weights widened to fp32, int8 ones multiplied in integers) it is timed only when
# asked for by name
BEHIND_INT8_IN_AVX2 = frozenset({"bf16-cpp"})
# 2.7-6.6x slower than the faster C++ step in every trial on the Zen 4 (AVX512-BF16, no AMX; models of 2 x 64 to
# 10 x 768, 1 to 10 rows): where the C++ step multiplies in AVX512-BF16 pair dot products it is timed only on a CPU
# with AMX, whose tiles oneDNN's packed bf16 layers use
BEHIND_BF16_DOTS_WITHOUT_AMX = frozenset({"bf16-sdpa+packed"})


def applies(kernel, weights):
    """Whether `kernel` computes a model with these weights here: packed needs bf16 weights and a oneDNN that
    packs them on this CPU (AVX-512 or AVX-NE-CONVERT), fp16 copies need weights of another dtype, plain ones fp32."""
    if kernel.linear == "packed":
        return (weights.dtype == torch.bfloat16 and bf16_supported(weights.device)
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))  # private oneDNN ops a later torch may change
    if kernel.linear == "fp16":
        return weights.dtype != torch.float16
    if kernel.linear == "plain":
        return weights.dtype == torch.float32
    return True


def kernel_candidates(model):
    """{name: SamplingKernel}: those of CANDIDATES that compute this model's weights on this machine."""
    weights = next(model.parameters())
    kernels = [k for k in CANDIDATES if applies(k, weights) and (k.attention != "cpp" or native.supports(model))]
    return {kernel.name: kernel for kernel in kernels}


def rewind(cache, length):
    for layer in cache.layers:
        layer.rewind(length)


def prepare_entrant(model, kernel, rows, keys, linears, caches):
    """A candidate's step, ready to be timed over its cache (shared by the candidates of one cache dtype) filled
    with `keys` positions, and the seconds its set-up took (copying weights, warming oneDNN up). Candidates of one
    kind of linear layers share their copies of the weights (`linears`). The cache holds a window of n_ctx tokens, as
    a run's does: each row's and head's keys then lie farther apart, and the Zen 4's steps over it took 8-18% longer
    than over a cache of `keys` + 1, the trial's before."""
    start = time.perf_counter()
    ids = torch.full((rows,), 5, dtype=torch.long, device=next(model.parameters()).device)
    if kernel.linear not in linears and kernel.attention != "cpp":
        linears[kernel.linear] = decode_linears(model, kernel.linear, rows)
    step = decode_step(model, kernel, rows, linears.get(kernel.linear))
    cache = caches.get(kernel.cache)
    if cache is None:
        capacity = max(keys + 1, context_length(model.config))
        cache = caches[kernel.cache] = preallocated_cache(model, capacity, kernel.cache_dtype)
        step(ids, cache)  # allocates the buffers
        for layer in cache.layers:
            layer.pretend_filled(keys)
    threads = getattr(step, "threads", None)  # the C++ step first times each of its thread counts (ThreadCount)
    warm_steps = 0
    while warm_steps < 2 or (threads and not threads.settled()):  # warms up what the kernel sets up on its first calls
        step(ids, cache)
        rewind(cache, keys)
        warm_steps += 1
    return step, cache, time.perf_counter() - start


FAR_BEHIND = 1.5  # a candidate this many times slower than the fastest after a round runs no more rounds


def measure_kernels(model, rows, keys, run_steps, rounds=3, steps=3, say=print, prepared=None):
    """{name: seconds a step} of every candidate kernel, stepping `rows` tokens over a cache already holding `keys`
    tokens, plus its set-up spread over `run_steps` steps (the C++ step's build is not counted: it is kept per
    machine). The candidates take turns for `rounds` rounds of `steps` steps, so that a neighbour's burst of work on
    a shared machine slows all of them alike, and each is given its median step: what a run's steps take (the
    fastest of a few promised too little). One FAR_BEHIND the fastest after a round sits the later rounds out: it
    cannot win, and its steps are the trial's longest. A candidate that cannot run here (no C++ compiler) is left
    out, in one line; so are those BEHIND_THE_CPP_STEP where it is written in this CPU's vector instructions, and
    those BEHIND_INT8_IN_AVX2 where it is written in AVX2 (a first run's trial then takes 0.2-0.6 s less), and those
    BEHIND_BF16_DOTS_WITHOUT_AMX where it multiplies in AVX512-BF16 on a CPU without AMX (0.4-0.8 s less).
    `prepared` (a dict), when given, receives each candidate's step by name, ready for a run of `rows` rows."""
    ids = torch.full((rows,), 5, dtype=torch.long, device=next(model.parameters()).device)
    linears, caches, entrants = {}, {}, {}
    candidates = kernel_candidates(model)
    in_cpp = [name for name, kernel in candidates.items() if kernel.attention == "cpp"]
    if in_cpp:
        try:
            left_out = BEHIND_THE_CPP_STEP if native.in_intrinsics() else frozenset()  # built once per machine
            if native.in_avx2() and "int8-cpp" in candidates:
                left_out |= BEHIND_INT8_IN_AVX2
            if native.in_bf16_dots() and "amx_bf16" not in cpu_features():
                left_out |= BEHIND_BF16_DOTS_WITHOUT_AMX
        except UserError as error:
            say(f"sampling kernel{'s' * (len(in_cpp) > 1)} {', '.join(in_cpp)} left out: {error}")
            left_out = in_cpp
        candidates = {name: kernel for name, kernel in candidates.items() if name not in left_out}
    for name, kernel in candidates.items():
        entrants[name] = prepare_entrant(model, kernel, rows, keys, linears, caches)
    times, racing = {name: [] for name in entrants}, dict(entrants)
    for _ in range(rounds):
        for name, (step, cache, _) in racing.items():
            for _ in range(steps):
                start = time.perf_counter()
                step(ids, cache)
                times[name].append(time.perf_counter() - start)
                rewind(cache, keys)
        best = min(statistics.median(times[name]) for name in racing)
        racing = {name: entry for name, entry in racing.items() if statistics.median(times[name]) <= FAR_BEHIND * best}
    if prepared is not None:
        prepared.update((name, step) for name, (step, _, _) in entrants.items())
    typical = {name: statistics.median(seconds) for name, seconds in times.items()}
    return {name: typical[name] + max(setup - 2 * typical[name], 0.0) / run_steps
            for name, (_, _, setup) in entrants.items()}


def choose_kernel(model, rows, keys, forced="auto", say=print, prepared=None):
    """The sampling kernel `forced` names, or with "auto" the fastest on this machine: measured once on the
    model's shapes (`rows` samples, a cache of `keys` tokens; set-up costs spread over a window of n_ctx steps) and
    remembered (kernel_trials) until the C++ step's code changes. A trial that runs fills `prepared` (a dict, when
    given) with the candidates' steps (measure_kernels)."""
    candidates = kernel_candidates(model)
    config, weights = model.config, next(model.parameters())
    shape = (f"{config.n_layer} layers x {config.n_embd} x {config.n_head} heads, vocab {config.vocab_size}, "
             f"{weights.dtype} | {rows} rows, {keys} cached tokens")
    if any(kernel.attention == "cpp" for kernel in candidates.values()):  # measured again when the C++ code changes
        shape += f" | decode_step.cpp {native_build.source_version()}"
    chosen = kernel_trials.choose("sampling kernel", "--sampling_kernel", forced, candidates, shape,
                                  lambda: measure_kernels(model, rows, keys, context_length(config), say=say,
                                                          prepared=prepared),
                                  "a step", say)
    return candidates[chosen]


