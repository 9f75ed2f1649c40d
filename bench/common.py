"""Shared by the benchmarks: the machine's measured matmul peak, and a one-line machine description."""
import platform
import time

import torch


def matmul_peak(dtype, size=2048, repeats=5):
    """FLOP/s of a size^3 matmul in `dtype` on the CPU, best of `repeats`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{torch.backends.cpu.get_cpu_capability()}, Python {platform.python_version()}")
