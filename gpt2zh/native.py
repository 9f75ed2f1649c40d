"""The whole sampling step in C++ (decode_step.cpp): compiled once per machine with its own instruction set, loaded
with ctypes, one call a step. A candidate of the sampling-kernel trial ("bf16-cpp"); where no C++ compiler with
OpenMP works, the trial leaves it out and asking for it says why."""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from .devices import cpu_name
from .errors import UserError
from .kernel_trials import choices_file
from .model import attention_scale, weight_out_in

SOURCE = Path(__file__).with_name("decode_step.cpp")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-Wno-psabi"]
ACTIVATIONS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu_fast": 0, "relu": 1}  # decode_step.cpp's Activation


def supports(model):
    """Whether the C++ step computes this model: a GPT-2 with bf16 weights on the CPU, an activation it knows."""
    weights = next(model.parameters())
    return (weights.dtype == torch.bfloat16 and weights.device.type == "cpu"
            and model.config.activation_function in ACTIVATIONS)


def compiler():
    return os.environ.get("CXX") or "c++"


@functools.cache
def library():
    """decode_step.cpp built for this machine (cached beside the kernel choices, keyed by source, compiler and
    CPU), loaded. Raises UserError saying what failed."""
    command = compiler()
    if shutil.which(command) is None:
        raise UserError(f"no C++ compiler: `{command}` is not on PATH (set CXX to one)")
    key = hashlib.sha256("\n".join([SOURCE.read_text(encoding="utf-8"), command, *FLAGS, cpu_name(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    path = choices_file().parent / f"decode_step-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        built = subprocess.run([command, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
        if built.returncode != 0:
            partial.unlink(missing_ok=True)
            lines = built.stderr.strip().splitlines() or ["(no message)"]
            first_error = next((line for line in lines if "error" in line), lines[0])[:200]
            raise UserError(f"`{command}` could not build {SOURCE.name}: {first_error}")
        os.replace(partial, path)
    lib = ctypes.CDLL(str(path))
    c_int, c_float, pointer = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.gpt2_decode_step.argtypes = [c_int] * 10 + [c_float] + [pointer] * 5
    lib.gpt2_decode_step.restype = None
    lib.gpt2_decode_pair_dot_in_bf16.restype = c_int
    return lib


def arithmetic():
    """How the built step multiplies on this CPU (for benchmarks' reports)."""
    if library().gpt2_decode_pair_dot_in_bf16():
        return "AVX512-BF16 pair dot products"
    return "fp32 vectors (no AVX512-BF16)"


def pack(weight):
    """A weight [in, out] as decode_step.cpp reads it: bf16 [tiles of 16 outputs, input pairs, 16, 2], zero-padded
    to an even number of inputs and whole tiles."""
    inputs, outputs = weight.shape
    pairs, tiles = (inputs + 1) // 2, (outputs + 15) // 16
    padded = torch.zeros(2 * pairs, 16 * tiles, dtype=torch.bfloat16)
    padded[:inputs, :outputs] = weight.detach()
    return padded.view(pairs, 2, tiles, 16).permute(2, 0, 3, 1).contiguous()  # [T, P, 16, 2]


class NativeDecodeStep:
    """DecodeStep's step (the same arguments and result) by decode_step.cpp: the residual stream, layer norms,
    softmax and sums in fp32, a bf16 cache, bf16 copies of the weights packed for streaming."""

    def __init__(self, model, kernel):
        if not supports(model):
            raise UserError(f"sampling kernel {kernel.name}: computes GPT-2s with bf16 weights on the CPU and "
                            f"activation {', '.join(ACTIVATIONS)}; --sampling_kernel chooses another")
        try:
            self.lib = library()
        except UserError as error:
            raise UserError(f"sampling kernel {kernel.name}: {error}; --sampling_kernel chooses another") from None
        config, transformer = model.config, model.transformer
        self.kernel, self.config = kernel, config
        self.wte, self.wpe = transformer.wte.weight.detach(), transformer.wpe.weight.detach()

        def fp32(tensor):
            return tensor.detach().float().contiguous()

        def linear(layer):
            return [pack(weight_out_in(layer).t()), fp32(layer.bias) if layer.bias is not None else None]

        params = []
        for block in transformer.h:
            params += [fp32(block.ln_1.weight), fp32(block.ln_1.bias), *linear(block.attn.c_attn),
                       *linear(block.attn.c_proj), fp32(block.ln_2.weight), fp32(block.ln_2.bias),
                       *linear(block.mlp.c_fc), *linear(block.mlp.c_proj)]
        scales = [attention_scale(config, index) for index in range(config.n_layer)]
        params += [fp32(transformer.ln_f.weight), fp32(transformer.ln_f.bias), *linear(model.lm_head)]
        self.params = params  # kept: the pointers below point into them
        self.pointers = (ctypes.c_void_p * len(params))(*(p.data_ptr() if p is not None else None for p in params))
        self.scales = (ctypes.c_float * len(scales))(*scales)
        self.inner = config.n_inner or 4 * config.n_embd

    @torch.no_grad()
    def __call__(self, ids, cache):
        """ids [B]: each row's newest token, at the position after the cache's; returns logits [B, vocab] (fp32)."""
        config, rows = self.config, ids.shape[0]
        cached = cache.get_seq_length()
        hidden = (self.wte[ids].float() + self.wpe[cached].float()).contiguous()  # [B, C]
        head_dim = config.n_embd // config.n_head
        buffers = []
        for layer in cache.layers:
            if not layer.is_initialized:  # a cache no forward pass has filled yet (the kernel trial's)
                empty = torch.empty(rows, config.n_head, 0, head_dim, dtype=torch.bfloat16)
                layer.lazy_initialization(empty, empty)
            if layer.key_buffer.dtype != torch.bfloat16 or layer.key_buffer.shape[0] != rows:
                raise ValueError(f"{self.kernel.name} steps {rows} rows over a bf16 cache, got "
                                 f"{layer.key_buffer.dtype} {tuple(layer.key_buffer.shape)}")
            buffers += [layer.key_buffer.data_ptr(), layer.value_buffer.data_ptr()]
        capacity = cache.layers[0].key_buffer.shape[2]
        if cached + 1 > capacity:  # the C++ side writes at position `cached` unchecked
            raise ValueError(f"the cache holds {capacity} tokens; slide the window before stepping past it")
        logits = torch.empty(rows, config.vocab_size)
        self.lib.gpt2_decode_step(
            rows, config.n_layer, config.n_embd, config.n_head, self.inner, config.vocab_size, cached, capacity,
            torch.get_num_threads(), ACTIVATIONS[config.activation_function], config.layer_norm_epsilon,
            self.scales, self.pointers, (ctypes.c_void_p * len(buffers))(*buffers), hidden.data_ptr(),
            logits.data_ptr())
        for layer in cache.layers:
            layer.rewind(cached + 1)
        return logits
