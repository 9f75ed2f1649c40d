"""Which device and precision to run with: --device (GPU ids, mps or cpu) against what this machine has,
torchrun's processes, and the autocast dtype the hardware supports."""
import os

import torch

from .cpu import cpu_features, cpu_name
from .errors import UserError


def parse_device_ids(spec, flag="--device"):
    """'0,1' -> [0, 1]; 'cpu' and 'mps' -> []. Anything else is the user's mistake."""
    spec = spec.strip().lower()
    if spec in ("cpu", "mps", ""):
        return []
    ids = []
    for part in spec.split(","):
        part = part.strip().removeprefix("cuda:")
        if not part.isdigit():
            raise UserError(f"{flag} {spec}: GPU ids are whole numbers separated by commas, e.g. {flag} 0,1 "
                            f"(or {flag} mps for a Mac's GPU, or {flag} cpu)")
        ids.append(int(part))
    return list(dict.fromkeys(ids))


def resolve_devices(spec, flag="--device", say=print):
    """The GPU ids to use (existing ones of those asked for), or [] for the CPU. Says what it chose."""
    asked = parse_device_ids(spec, flag)
    available = torch.cuda.device_count()
    if not asked:
        say("device: CPU")
        return []
    if available == 0:
        say(f"device: CPU ({flag} {spec} names GPUs, but this machine has none)")
        return []
    existing = [i for i in asked if i < available]
    if not existing:
        existing = [0]
        say(f"{flag} {spec}: this machine has {available} GPU(s) (ids 0-{available - 1}); using GPU 0")
    elif len(existing) < len(asked):
        say(f"{flag} {spec}: GPU(s) {', '.join(str(i) for i in asked if i >= available)} do not exist here; "
            f"using {', '.join(map(str, existing))}")
    for i in existing:
        say(f"device: GPU {i} ({torch.cuda.get_device_name(i)})")
    return existing


def distributed_rank():
    """(rank, local_rank, world_size) under torchrun, else (0, 0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world


def distributed_device(spec, local_rank):
    """The device of one torchrun process: the CPU when `spec` says cpu or there is no GPU, else its own GPU."""
    if not parse_device_ids(spec) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{local_rank}")


def mps_available():
    """Whether this machine has an Apple GPU torch can use (Apple Silicon, macOS 12.3 or later)."""
    return torch.backends.mps.is_available()


def pick_device(spec, flag="--device", say=print):
    """The device a single-process run uses and the ids of all the GPUs of `spec` that exist: the first GPU of
    `spec` that exists; where `spec` names GPUs and there is none, a Mac's GPU (mps) where there is one, else the CPU;
    `mps` asks for the Mac's GPU."""
    if spec.strip().lower() == "mps":
        if not mps_available():
            raise UserError(f"{flag} mps: this machine has no Apple GPU that torch can use "
                            f"(torch.backends.mps.is_available() is False); use {flag} cpu")
        say("device: Apple GPU (mps)")
        return torch.device("mps"), []
    if parse_device_ids(spec, flag) and not torch.cuda.is_available() and mps_available():
        say(f"device: Apple GPU (mps) ({flag} {spec} names CUDA GPUs; this machine has none, but an Apple GPU)")
        return torch.device("mps"), []
    gpu_ids = resolve_devices(spec, flag, say)
    return torch.device(f"cuda:{gpu_ids[0]}" if gpu_ids else "cpu"), gpu_ids


# oneDNN's instruction-set ceilings (ONEDNN_MAX_CPU_ISA) below its bf16 arithmetic
ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"})


def bf16_supported(device):
    """Whether `device` computes in bf16 at speed: CUDA GPUs that have it, Apple GPUs on macOS 14 or later (asked
    for with --precision bf16), CPUs with AVX512-BF16 or AMX, unless oneDNN is held below them (a simulated AVX2
    CPU, bench/simulated_avx2.py: torch still says yes there, and bf16 would run emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        newer = getattr(torch.backends.mps, "is_macos_or_newer", None)
        return bool(newer and newer(14, 0))
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ISAS_WITHOUT_BF16:
        return False
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(device, precision, fp16):
    """The autocast dtype for `--precision` (auto/bf16/fp32) and `--fp16`; None means plain fp32."""
    if fp16:
        if device.type != "cuda":
            raise UserError("--fp16: needs a CUDA GPU; on CPU use --precision bf16 (the default where supported)")
        return torch.float16
    if precision == "fp32":
        return None
    if precision == "bf16" and not bf16_supported(device):
        raise UserError(f"--precision bf16: this {device.type.upper()} has no fast bf16; use --precision fp32")
    if device.type == "mps" and precision == "auto":
        return None  # torch's bf16 on Apple GPUs is young: asked for, not assumed
    return torch.bfloat16 if bf16_supported(device) else None


def precision_name(dtype):
    return f"fp32 weights, {str(dtype).removeprefix('torch.')} autocast" if dtype else "fp32"


def machine_key():
    """What decides which kernels may run and which is fastest here, for keying what is remembered per machine:
    the CPU's name and instruction-set extensions, the vector width PyTorch's own kernels use and the ceiling oneDNN
    is given (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA: a simulated AVX2 CPU gets its own entries)."""
    capability = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    return f"{cpu_name()} [{' '.join(sorted(cpu_features()))}] {capability}{' onednn ' + onednn if onednn else ''}"
