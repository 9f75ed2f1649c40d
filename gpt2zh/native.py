"""The whole sampling step in C++ (decode_step.cpp): compiled once per machine with its own instruction set, loaded
with ctypes, one call a step. Two candidates of the sampling-kernel trial: "bf16-cpp" and "int8-cpp" (int8 weights,
and each linear layer's inputs quantized as it runs); where no C++ compiler with OpenMP works, the trial leaves them
out and asking for one says why."""
import collections
import ctypes
import statistics
import time

import torch

from .errors import UserError
from .model import attention_scale, weight_out_in
from .native_build import library

ACTIVATIONS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu_fast": 0, "relu": 1}  # decode_step.cpp's Activation


def supports(model):
    """Whether the C++ step computes this model: a GPT-2 on the CPU with bf16 weights, or fp32 ones (it streams bf16
    copies: half the bytes, what a CPU without fast bf16 arithmetic loads), an activation it knows."""
    weights = next(model.parameters())
    return (weights.dtype in (torch.bfloat16, torch.float32) and weights.device.type == "cpu"
            and model.config.activation_function in ACTIVATIONS)


ARITHMETIC = ("the compiler's portable vectors", "AVX2 with FMA", "AVX-512", "AVX512-BF16 pair dot products")


def arithmetic():
    """How the built step multiplies on this CPU (for benchmarks' reports)."""
    return ARITHMETIC[library().gpt2_decode_arithmetic()]


def in_intrinsics():
    """Whether the step is written in this CPU's vector instructions (AVX2 or AVX-512), where the PyTorch kernels
    were measured to lose to it (decoding.BEHIND_THE_CPP_STEP), or in the compiler's portable vectors (ARM, say)."""
    return arithmetic() != ARITHMETIC[0]


def in_avx2():
    """Whether the step is written in AVX2 (with FMA): bf16 weights are widened to fp32 there, where int8 weights
    are multiplied in integers, and int8-cpp was measured to win (decoding.BEHIND_INT8_IN_AVX2)."""
    return arithmetic() == "AVX2 with FMA"


def in_bf16_dots():
    """Whether the step multiplies bf16 weights by AVX512-BF16's pair dot products, where oneDNN's packed bf16
    kernels were measured to lose to it unless the CPU has AMX (decoding.BEHIND_BF16_DOTS_WITHOUT_AMX)."""
    return arithmetic() == "AVX512-BF16 pair dot products"


def fp32(tensor):
    return tensor.detach().float().contiguous()


def packed_linear(layer, weights):
    """[the packed weight, its int8 scales or None, the fp32 bias or None] of a linear layer, as decode_step.cpp's
    params list them; `weights` "bf16" or "int8"."""
    weight = weight_out_in(layer).t().detach()  # [in, out]
    bias = fp32(layer.bias) if layer.bias is not None else None
    if weights == "int8":
        return [*pack_int8(weight), bias]
    return [pack(weight), None, bias]


def source(weight):
    """A weight as the C++ packers read it: (bf16 or fp32 weight, whether bf16)."""
    if weight.dtype != torch.bfloat16:
        weight = weight.float()
    return weight, weight.dtype == torch.bfloat16


def pack(weight):
    """A weight [in, out] as decode_step.cpp reads bf16 ones, packed by the C++ side in one pass: zero-padded to whole
    input pairs and tiles of 16 outputs, [tiles, input pairs, 16, 2] bf16."""
    weight, is_bf16 = source(weight)
    inputs, outputs = weight.shape
    packed = torch.empty(-(-outputs // 16), -(-inputs // 2), 16, 2, dtype=torch.bfloat16)
    library().gpt2_pack_bf16(inputs, outputs, weight.data_ptr(), is_bf16, weight.stride(0), weight.stride(1),
                             packed.data_ptr(), torch.get_num_threads())
    return packed


def quantized(x, levels):
    """x's last dimension rounded to -levels..levels, its largest magnitude to `levels`, as decode_step.cpp's
    quantize rounds a linear layer's input row (63 levels) or a head's key or value (127): (the levels, the scale
    each slice's are worth) — x ~ levels * scale."""
    x = x.float()
    top = x.abs().amax(dim=-1, keepdim=True)
    times = torch.where(top > 0, top.reciprocal() * levels, torch.zeros_like(top))  # decode_step.cpp's product
    return torch.round(x * times).clamp(-levels, levels), top / levels


def pack_int8(weight):
    """A weight [in, out] as decode_step.cpp reads int8 ones, and the scale of each output: each output's inputs
    rounded as `quantized` rounds them to 127 levels (weight ~ int8 * scale), packed by the C++ side in one pass
    ([tiles of 16 outputs, input quads, 16, 4] uint8, int8 + 128; [out] fp32)."""
    weight, is_bf16 = source(weight)
    inputs, outputs = weight.shape
    packed = torch.empty(-(-outputs // 16), -(-inputs // 4), 16, 4, dtype=torch.uint8)
    scales = torch.empty(outputs)
    library().gpt2_pack_int8(inputs, outputs, weight.data_ptr(), is_bf16, weight.stride(0), weight.stride(1),
                             packed.data_ptr(), scales.data_ptr(), torch.get_num_threads())
    return packed, scales


def use_threads(count):
    """torch's thread count set to `count`, only when it differs (the sampling loop asks after every step)."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


class ThreadCount:
    """How many threads the C++ step runs on: torch's thread count, or one. Its ~20 parallel regions a step each wait
    for every thread; when other programs keep the cores busy, a thread that shares its core with a waiting one
    (OpenMP waits by spinning) can cost a scheduler slice a region: 408 ms a step of the seed config where two cores
    take 4 (docs/BENCHMARKS.md, "The C++ step on a busy machine"). Each step is timed; a count's time is the median
    of its last TRIES steps (one slow step does not move it; a count's first step, which starts its threads, is
    left out), and the faster count runs: when torch's count slows past one thread's last time, one thread runs
    again and is timed afresh. On one thread, torch's count is tried again, for TRIES steps, once the steps on one
    thread since it last ran took SHARE times its time (the load may have gone): that costs at most TRIES/SHARE of
    the time, and a quiet machine tries nothing after its first steps. The result is the same with any count (each
    output is computed by one thread). Entered (`with step.threads:`), it runs torch's own ops on the count the step
    last ran on, and gives torch its count back on leaving: the sampling loop's logits processors, draw and
    re-encoding wait for each other's threads as the step's regions do (docs/BENCHMARKS.md)."""

    TRIES = 3
    SHARE = 100

    def __init__(self):
        self.process = torch.get_num_threads()  # torch's count when the step was made
        self.latest, self.following = self.process, False  # the count of the latest step; inside `with`
        self.recent = {}  # {threads: seconds of its last TRIES steps}
        self.started = set()
        self.trying, self.tries_left, self.on_fewer = None, 0, 0.0  # seconds on fewer threads than torch's

    def __enter__(self):
        self.following = True
        use_threads(self.latest)
        return self

    def __exit__(self, *exception):
        self.following = False
        use_threads(self.process)

    def seconds(self, threads):
        return statistics.median(self.recent[threads])

    def counts(self):
        return sorted({self.process, 1}, reverse=True)

    def untried(self):
        return [count for count in self.counts() if len(self.recent.get(count, ())) < self.TRIES]

    def settled(self):
        """Whether each count has been timed (a trial times the steps that come after)."""
        return not self.untried()

    def choose(self):
        counts, untried = self.counts(), self.untried()
        if untried:
            return untried[0]
        if self.tries_left:
            self.tries_left -= 1
            return self.trying
        best = min(counts, key=self.seconds)
        other = next((count for count in counts if count != best), best)
        if other > best and self.on_fewer >= self.SHARE * self.seconds(other):
            self.trying, self.tries_left = other, self.TRIES - 1
            return other
        return best

    def record(self, threads, seconds):
        self.latest = threads
        if self.following:
            use_threads(threads)
        if threads not in self.started:
            self.started.add(threads)
            return
        self.recent.setdefault(threads, collections.deque(maxlen=self.TRIES)).append(seconds)
        self.on_fewer = self.on_fewer + seconds if threads < self.process else 0.0


class NativeDecodeStep:
    """DecodeStep's step (the same arguments and result) by decode_step.cpp: the residual stream, layer norms and
    softmax in fp32; bf16 copies of the weights packed for streaming and a bf16 cache, or int8 ones of both."""

    def __init__(self, model, kernel):
        if not supports(model):
            raise UserError(f"sampling kernel {kernel.name}: computes GPT-2s with bf16 or fp32 weights on the CPU and "
                            f"activation {', '.join(ACTIVATIONS)}; --sampling_kernel chooses another")
        try:
            self.lib = library()
        except UserError as error:
            raise UserError(f"sampling kernel {kernel.name}: {error}; --sampling_kernel chooses another") from None
        config, transformer = model.config, model.transformer
        self.kernel, self.config = kernel, config
        self.wte, self.wpe = transformer.wte.weight.detach(), transformer.wpe.weight.detach()

        params, weights = [], kernel.linear
        for block in transformer.h:
            params += [fp32(block.ln_1.weight), fp32(block.ln_1.bias), *packed_linear(block.attn.c_attn, weights),
                       *packed_linear(block.attn.c_proj, weights), fp32(block.ln_2.weight), fp32(block.ln_2.bias),
                       *packed_linear(block.mlp.c_fc, weights), *packed_linear(block.mlp.c_proj, weights)]
        scales = [attention_scale(config, index) for index in range(config.n_layer)]
        params += [fp32(transformer.ln_f.weight), fp32(transformer.ln_f.bias), *packed_linear(model.lm_head, weights)]
        self.params = params  # kept: the pointers below point into them
        self.pointers = (ctypes.c_void_p * len(params))(*(p.data_ptr() if p is not None else None for p in params))
        self.scales = (ctypes.c_float * len(scales))(*scales)
        self.inner = config.n_inner or 4 * config.n_embd
        self.threads = ThreadCount()

    def buffers(self, cache, rows):
        """The C++ step's pointers to the cache's buffers (keys, values, their int8 scales, each layer), checked and
        made on its first step of `rows` rows, kept on the cache: its buffers stay where they are."""
        config, dtype, buffers = self.config, self.kernel.cache_dtype, []
        if cache.pointers is not None and cache.pointers[:2] == (dtype, rows):
            return cache.pointers[2]
        for layer in cache.layers:
            if not layer.is_initialized:  # a cache no forward pass has filled yet (the kernel trial's)
                empty = torch.empty(rows, config.n_head, 0, config.n_embd // config.n_head, dtype=dtype)
                layer.lazy_initialization(empty, empty)
            if layer.key_buffer.dtype != dtype or layer.key_buffer.shape[0] != rows:
                raise ValueError(f"{self.kernel.name} steps {rows} rows over a {dtype} cache, got "
                                 f"{layer.key_buffer.dtype} {tuple(layer.key_buffer.shape)}")
            scales = (layer.key_scales, layer.value_scales) if dtype == torch.int8 else (None, None)
            buffers += [buffer.data_ptr() if buffer is not None else None
                        for buffer in (layer.key_buffer, layer.value_buffer, *scales)]
        cache.pointers = dtype, rows, (ctypes.c_void_p * len(buffers))(*buffers)
        return cache.pointers[2]

    @torch.no_grad()
    def __call__(self, ids, cache):
        """ids [B]: each row's newest token, at the position after the cache's; returns logits [B, vocab] (fp32)."""
        config, rows = self.config, ids.shape[0]
        cached = cache.get_seq_length()
        hidden = (self.wte[ids].float() + self.wpe[cached].float()).contiguous()  # [B, C]
        buffers = self.buffers(cache, rows)
        capacity = cache.layers[0].key_buffer.shape[2]
        if cached + 1 > capacity:  # the C++ side writes at position `cached` unchecked
            raise ValueError(f"the cache holds {capacity} tokens; slide the window before stepping past it")
        logits = torch.empty(rows, config.vocab_size)
        threads, start = self.threads.choose(), time.perf_counter()
        self.lib.gpt2_decode_step(
            rows, config.n_layer, config.n_embd, config.n_head, self.inner, config.vocab_size, cached, capacity,
            threads, ACTIVATIONS[config.activation_function], config.layer_norm_epsilon,
            self.scales, self.pointers, buffers, hidden.data_ptr(),
            logits.data_ptr())
        self.threads.record(threads, time.perf_counter() - start)
        for layer in cache.layers:
            layer.rewind(cached + 1)
        return logits
