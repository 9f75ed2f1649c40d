"""Building decode_step.cpp for this machine: the compiler, its flags, a build kept per machine under a key of what
it may execute, started in a background thread early (before torch is imported, by generate.py) so that a first run
on a machine waits for it as little as possible. No torch here: importing torch takes 1-4 s, a build about 3.6."""
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

from .cpu import cpu_features
from .errors import UserError
from .fileio import cache_dir, write_json_atomic

# two translation units and their header, compiled side by side (a core each) then linked
SOURCES = [Path(__file__).with_name(name) for name in ("decode_step.cpp", "decode_attention.cpp")]
HEADER = Path(__file__).with_name("decode_step.h")
# -fno-trapping-math: floating-point exceptions are never looked at, so the compiler may turn the comparisons of
# exp_approx's clamp and softmax's maximum into vector instructions (the softmax and GELU loops stayed scalar)
FLAGS = ["-std=c++17", "-fno-trapping-math", "-fPIC", "-Wno-psabi"]
OPTIMIZATION = "-O3"  # -O2 built faster, but its steps were slower (docs/BENCHMARKS.md)
OPENMP = "-fopenmp"
# the compiler's macros for the instruction sets it targets, as the CPU's flags name them (cpu.ISA_FLAGS)
TARGET_MACROS = {"__SSE4_2__": "sse4_2", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c",
                 "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl",
                 "__AVX512DQ__": "avx512dq", "__AVX512BF16__": "avx512_bf16", "__AVX512FP16__": "avx512_fp16",
                 "__AVX512VNNI__": "avx512_vnni", "__AVXVNNI__": "avx_vnni", "__AMX_TILE__": "amx_tile",
                 "__AMX_BF16__": "amx_bf16", "__ARM_NEON": "asimd", "__ARM_FEATURE_SVE": "sve",
                 "__ARM_FEATURE_BF16_VECTOR_ARITHMETIC": "bf16", "__ARM_FEATURE_MATMUL_INT8": "i8mm"}


def compiler():
    return os.environ.get("CXX") or "c++"


def architecture_flag(march=None):
    """-march=native: the instruction sets of the CPU that builds; GPT2ZH_MARCH (or `march`) names another (e.g.
    haswell, an AVX2 CPU, to measure one on an AVX-512 machine)."""
    return f"-march={march or os.environ.get('GPT2ZH_MARCH') or 'native'}"


def target_features(command, march=None):
    """The instruction-set extensions `command` compiles for with architecture_flag(march) (its predefined macros);
    empty where the compiler cannot say."""
    try:
        macros = subprocess.run([command, architecture_flag(march), "-dM", "-E", "-x", "c++", os.devnull],
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


def build(command, path, march=None, optimization=OPTIMIZATION):
    """Compile decode_step.cpp and decode_attention.cpp to `path` for architecture_flag(march), with OpenMP where the
    compiler has it (macOS's clang has none: then one thread). Returns whether OpenMP is in; raises UserError with the
    compiler's first error. `optimization` (e.g. -O0) replaces -O3 where only whether it compiles matters."""
    errors = []
    common = [optimization, *FLAGS]
    for flags in ([*common, OPENMP], common):
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        objects = [partial.with_suffix(f".{source.stem}.o") for source in SOURCES]
        jobs = [subprocess.Popen([command, *flags, architecture_flag(march), "-c", str(source), "-o", str(obj)],
                                 stderr=subprocess.PIPE, text=True)
                for source, obj in zip(SOURCES, objects, strict=True)]
        messages = [job.communicate()[1] for job in jobs]
        failed = [message for job, message in zip(jobs, messages, strict=True) if job.returncode != 0]
        if not failed:
            linked = subprocess.run([command, *flags, "-shared", *map(str, objects), "-o", str(partial)],
                                    capture_output=True, text=True)
            failed = [linked.stderr] if linked.returncode != 0 else []
        for obj in objects:
            obj.unlink(missing_ok=True)
        if not failed:
            os.replace(partial, path)
            return OPENMP in flags
        partial.unlink(missing_ok=True)
        lines = failed[0].strip().splitlines() or ["(no message)"]
        errors.append(next((line for line in lines if "error" in line), lines[0])[:200])
    raise UserError(f"`{command}` could not build {SOURCES[0].name}: {errors[0]}")


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
    imports torch and loads the model (a first run on a machine waits seconds less)."""
    building()


@functools.cache
def building():
    """The one build of this process, a Future of build_and_load()'s result (its UserError kept for every caller).
    Not a daemon thread: a process that ends early (a mistake in its flags) waits for the compiler instead of leaving
    it orphaned, writing a half-built file; the build is kept for the next run."""
    future = Future()
    threading.Thread(target=settle, args=(future,), name="decode_step build").start()
    return future


def settle(future):
    try:
        future.set_result(build_and_load())
    except Exception as error:  # noqa: BLE001 -- handed to whoever waits for the library
        future.set_exception(error)


@functools.cache  # read once a process: the build key and every trial's key use it
def source_text():
    return "\n".join(source.read_text(encoding="utf-8") for source in [HEADER, *SOURCES])


def source_version():
    """A short digest of the C++ step's code: the kernel trial's timings of other code are not this code's."""
    return hashlib.sha256(source_text().encode()).hexdigest()[:12]


def build_and_load():
    """decode_step.cpp built for this machine and loaded. Cached beside the kernel choices under a key of the source,
    the compiler and the instruction sets it targets, with a note of those instruction sets: a build whose note names
    one this CPU lacks (a cache directory copied from another machine) is built again, never loaded."""
    command = compiler()
    if shutil.which(command) is None:
        raise UserError(f"no C++ compiler: `{command}` is not on PATH (set CXX to one)")
    features = target_features(command)
    key = hashlib.sha256("\n".join([source_text(), command, compiler_version(command), OPTIMIZATION, *FLAGS,
                                    architecture_flag(), *sorted(features), platform.machine()]).encode()).hexdigest()
    if not features <= cpu_features():
        raise UserError(f"{architecture_flag()} builds the C++ step for {', '.join(sorted(features - cpu_features()))}"
                        f", which this CPU lacks; unset GPT2ZH_MARCH")
    path = cache_dir() / f"decode_step-{key[:16]}.so"
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
    lib.gpt2_decode_arithmetic.restype = c_int
    c_int64 = ctypes.c_int64
    lib.gpt2_pack_int8.argtypes = [c_int, c_int, pointer, c_int, c_int64, c_int64, pointer, pointer, c_int]
    lib.gpt2_pack_int8.restype = None
    lib.gpt2_pack_bf16.argtypes = [c_int, c_int, pointer, c_int, c_int64, c_int64, pointer, c_int]
    lib.gpt2_pack_bf16.restype = None
    return lib
