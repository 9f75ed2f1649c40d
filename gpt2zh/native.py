"""The whole sampling step in C++ (decode_step.cpp): compiled once per machine with its own instruction set, loaded
with ctypes, one call a step. A candidate of the sampling-kernel trial ("bf16-cpp"); where no C++ compiler with
OpenMP works, the trial leaves it out and asking for it says why."""
import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import threading
from concurrent.futures import Future
from pathlib import Path

import torch

from .devices import cpu_features
from .errors import UserError
from .fileio import write_json_atomic
from .kernel_trials import choices_file
from .model import attention_scale, weight_out_in

SOURCE = Path(__file__).with_name("decode_step.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-Wno-psabi"]
OPENMP = "-fopenmp"
ACTIVATIONS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu_fast": 0, "relu": 1}  # decode_step.cpp's Activation
# the compiler's macros for the instruction sets it targets, as the CPU's flags name them (devices.ISA_FLAGS)
TARGET_MACROS = {"__SSE4_2__": "sse4_2", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c",
                 "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl",
                 "__AVX512DQ__": "avx512dq", "__AVX512BF16__": "avx512_bf16", "__AVX512FP16__": "avx512_fp16",
                 "__AVX512VNNI__": "avx512_vnni", "__AVXVNNI__": "avx_vnni", "__AMX_TILE__": "amx_tile",
                 "__AMX_BF16__": "amx_bf16", "__ARM_NEON": "asimd", "__ARM_FEATURE_SVE": "sve",
                 "__ARM_FEATURE_BF16_VECTOR_ARITHMETIC": "bf16", "__ARM_FEATURE_MATMUL_INT8": "i8mm"}


def supports(model):
    """Whether the C++ step computes this model: a GPT-2 on the CPU with bf16 weights, or fp32 ones (it streams bf16
    copies: half the bytes, what a CPU without fast bf16 arithmetic loads), an activation it knows."""
    weights = next(model.parameters())
    return (weights.dtype in (torch.bfloat16, torch.float32) and weights.device.type == "cpu"
            and model.config.activation_function in ACTIVATIONS)


def compiler():
    return os.environ.get("CXX") or "c++"


def architecture_flag():
    """-march=native: the instruction sets of the CPU that builds; GPT2ZH_MARCH names another (e.g. haswell, an
    AVX2 CPU, to measure one on an AVX-512 machine)."""
    return f"-march={os.environ.get('GPT2ZH_MARCH') or 'native'}"


def target_features(command):
    """The instruction-set extensions `command` compiles for with architecture_flag() (its predefined macros);
    empty where the compiler cannot say."""
    try:
        macros = subprocess.run([command, architecture_flag(), "-dM", "-E", "-x", "c++", os.devnull],
                                capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    defined = {line.split()[1] for line in macros.splitlines() if line.startswith("#define ")}
    return frozenset(flag for macro, flag in TARGET_MACROS.items() if macro in defined)


def compiler_version(command):
    try:
        out = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.splitlines() or [""])[0]


def build(command, path):
    """Compile decode_step.cpp to `path`, with OpenMP where the compiler has it (macOS's clang has none: then one
    thread). Returns whether OpenMP is in; raises UserError with the compiler's first error."""
    errors = []
    for flags in ([*FLAGS, OPENMP], FLAGS):
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        built = subprocess.run([command, *flags, architecture_flag(), str(SOURCE), "-o", str(partial)],
                               capture_output=True, text=True)
        if built.returncode == 0:
            os.replace(partial, path)
            return OPENMP in flags
        partial.unlink(missing_ok=True)
        lines = built.stderr.strip().splitlines() or ["(no message)"]
        errors.append(next((line for line in lines if "error" in line), lines[0])[:200])
    raise UserError(f"`{command}` could not build {SOURCE.name}: {errors[0]}")


def built_for(note):
    """The instruction sets a build's note says it was compiled for (None without a note)."""
    try:
        return set(json.loads(note.read_text(encoding="utf-8"))["features"])
    except (OSError, ValueError, KeyError):
        return None


def library():
    """decode_step.cpp built for this machine and loaded (waiting for a build start_building() began). Raises
    UserError saying what failed."""
    return building().result()


def start_building():
    """Builds or finds the C++ step in a background thread: the compiler runs on another core while this process
    imports and loads the model (a first run on a machine waits seconds less)."""
    building()


@functools.cache
def building():
    """The one build of this process, a Future of build_and_load()'s result (its UserError kept for every caller)."""
    future = Future()
    threading.Thread(target=settle, args=(future,), name="decode_step build", daemon=True).start()
    return future


def settle(future):
    try:
        future.set_result(build_and_load())
    except Exception as error:  # noqa: BLE001 -- handed to whoever waits for the library
        future.set_exception(error)


def build_and_load():
    """decode_step.cpp built for this machine and loaded. Cached beside the kernel choices under a key of the source,
    the compiler and the instruction sets it targets, with a note of those instruction sets: a build whose note names
    one this CPU lacks (a cache directory copied from another machine) is built again, never loaded."""
    command = compiler()
    if shutil.which(command) is None:
        raise UserError(f"no C++ compiler: `{command}` is not on PATH (set CXX to one)")
    features = target_features(command)
    key = hashlib.sha256("\n".join([SOURCE.read_text(encoding="utf-8"), command, compiler_version(command), *FLAGS,
                                    architecture_flag(), *sorted(features), platform.machine()]).encode()).hexdigest()
    if not features <= cpu_features():
        raise UserError(f"{architecture_flag()} builds {SOURCE.name} for {', '.join(sorted(features - cpu_features()))}"
                        f", which this CPU lacks; unset GPT2ZH_MARCH")
    path = choices_file().parent / f"decode_step-{key[:16]}.so"
    note = path.with_suffix(".json")
    needs = built_for(note)
    if not path.exists() or needs is None or not needs <= cpu_features():
        path.parent.mkdir(parents=True, exist_ok=True)
        openmp = build(command, path)
        write_json_atomic(note, {"features": sorted(features), "openmp": openmp, "compiler": compiler_version(command)})
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


def fp32(tensor):
    return tensor.detach().float().contiguous()


def packed_linear(layer):
    """[the packed weight, the fp32 bias or None] of a linear layer, as decode_step.cpp's params list them."""
    return [pack(weight_out_in(layer).t()), fp32(layer.bias) if layer.bias is not None else None]


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
            raise UserError(f"sampling kernel {kernel.name}: computes GPT-2s with bf16 or fp32 weights on the CPU and "
                            f"activation {', '.join(ACTIVATIONS)}; --sampling_kernel chooses another")
        try:
            self.lib = library()
        except UserError as error:
            raise UserError(f"sampling kernel {kernel.name}: {error}; --sampling_kernel chooses another") from None
        config, transformer = model.config, model.transformer
        self.kernel, self.config = kernel, config
        self.wte, self.wpe = transformer.wte.weight.detach(), transformer.wpe.weight.detach()

        params = []
        for block in transformer.h:
            params += [fp32(block.ln_1.weight), fp32(block.ln_1.bias), *packed_linear(block.attn.c_attn),
                       *packed_linear(block.attn.c_proj), fp32(block.ln_2.weight), fp32(block.ln_2.bias),
                       *packed_linear(block.mlp.c_fc), *packed_linear(block.mlp.c_proj)]
        scales = [attention_scale(config, index) for index in range(config.n_layer)]
        params += [fp32(transformer.ln_f.weight), fp32(transformer.ln_f.bias), *packed_linear(model.lm_head)]
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
