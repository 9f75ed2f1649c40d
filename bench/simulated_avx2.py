"""Run a command as on an AVX2 CPU without bf16 (the CPU of most laptops), on an x86 machine with AVX-512: torch's
own kernels at AVX2 (ATEN_CPU_CAPABILITY=avx2), oneDNN's at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, so --precision auto
trains in fp32), the C++ sampling step built for Haswell (GPT2ZH_MARCH=haswell). Kernel choices and builds are
remembered apart from the machine's own (devices.machine_key, native_build). It first prints what the command will
see, then runs it. Measured on a Zen 4 in issue 22: the simulation trained about a quarter faster than a real Zen 3,
so a one-core run (taskset -c 0) is the case that stands for slower CPUs.
Run from the project root, e.g.:
  python bench/simulated_avx2.py python cpu_preset.py ../shared/corpus/xiyouji.txt
  python bench/simulated_avx2.py taskset -c 0 python cpu_preset.py ../shared/corpus/xiyouji.txt
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIMULATION = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "GPT2ZH_MARCH": "haswell"}
SEEN = ("import torch; from gpt2zh import native_build; from gpt2zh.devices import bf16_supported; "
        "print('simulated AVX2: torch kernels', torch.backends.cpu.get_cpu_capability(), '| fast bf16',"
        " bf16_supported(torch.device('cpu')), '| the C++ step built for',"
        " ' '.join(sorted(native_build.target_features(native_build.compiler()))) or 'nothing (no compiler)')")


def main():
    sys.path.insert(0, str(ROOT))
    from gpt2zh.cpu import cpu_features

    command = sys.argv[1:]
    if not command or command[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if command else 2
    if not {"avx2", "fma", "f16c"} <= cpu_features():
        print("simulated_avx2.py: this CPU has no AVX2, FMA and F16C to hold the run to (an x86 CPU with AVX-512 is "
              "what it is for)", file=sys.stderr)
        return 2
    env = {**os.environ, **SIMULATION}
    subprocess.run([sys.executable, "-c", SEEN], cwd=ROOT, env=env, check=True)
    return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
