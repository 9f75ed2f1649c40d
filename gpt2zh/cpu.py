"""What the CPU is: its name and instruction-set extensions (no torch: the C++ step's build, started before torch is
imported, keys on them)."""
import platform


def cpu_name():
    """The CPU's model name, as lscpu (Linux) or sysctl (macOS) shows it."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        name = sysctl("machdep.cpu.brand_string").strip()
    return name or platform.processor() or platform.machine()


def sysctl(*names):
    """macOS's sysctl values (empty elsewhere)."""
    import subprocess

    if platform.system() != "Darwin":
        return ""
    try:
        return subprocess.run(["sysctl", *names], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


# The instruction-set extensions that decide which kernels run and how fast (names as /proc/cpuinfo spells them).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
             "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "asimd", "sve", "bf16", "i8mm")


def cpu_features():
    """The CPU's instruction-set extensions (a subset of ISA_FLAGS): /proc/cpuinfo's flags on Linux, sysctl's on
    macOS; an ARM CPU has at least NEON."""
    words = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    words.update(line.split(":", 1)[1].split())
    except OSError:  # macOS: "machdep.cpu.features: ... AVX1.0 FMA F16C", "hw.optional.arm.FEAT_BF16: 1"
        for line in sysctl("-a").lower().splitlines():
            name, _, value = line.partition(":")
            if name.startswith("machdep.cpu") and "features" in name:
                words.update(value.replace("avx1.0", "avx").split())
            elif name.startswith("hw.optional.arm.feat_") and value.strip() == "1":
                words.add(name.removeprefix("hw.optional.arm.feat_"))
    if platform.machine().lower() in ("arm64", "aarch64"):
        words.add("asimd")
    return frozenset(words & set(ISA_FLAGS))
