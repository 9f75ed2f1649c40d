"""What is remembered per machine (the C++ step's build, the kernel trials' choices) is keyed by what the code may
execute, so a cache directory that travels to another CPU can neither crash a run nor change its numbers."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run, train_args
from safetensors.torch import load_file

from gpt2zh.cpu import cpu_features

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "c++") is None, reason="no C++ compiler")


@needs_compiler
def test_two_cpus_of_one_name_get_two_builds_and_two_choices_and_a_foreign_build_is_rebuilt(tmp_path, monkeypatch):
    """Two CPUs that both call themselves "AMD EPYC", one with AVX-512 and bf16 (a Zen 4) and one with AVX2 only
    (a Zen 3), share a cache directory. Each gets its own build of the C++ step and its own kernel choice; a build
    whose note names instruction sets the CPU lacks is compiled again, never loaded."""
    from gpt2zh import devices, kernel_trials, native_build

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(devices, "cpu_name", lambda: "AMD EPYC")
    loaded, builds = [], []
    monkeypatch.setattr(native_build.ctypes, "CDLL", lambda path: loaded.append(path) or FakeLibrary())
    real_build = native_build.build
    monkeypatch.setattr(native_build, "build", lambda command, path: builds.append(path) or real_build(command, path))

    def become(march):
        monkeypatch.setenv("GPT2ZH_MARCH", march)
        features = native_build.target_features(native_build.compiler())
        monkeypatch.setattr(devices, "cpu_features", lambda: features)
        monkeypatch.setattr(native_build, "cpu_features", lambda: features)
        native_build.building.cache_clear()
        return features

    zen4, zen3 = become("sapphirerapids"), become("haswell")
    assert {"avx512f", "avx512_bf16"} <= zen4 and "avx2" in zen3 and "avx512f" not in zen3
    choices = {}
    for march, fastest in (("sapphirerapids", "wide"), ("haswell", "narrow")):
        become(march)
        native_build.library()
        timings = {"wide": 1.0, "narrow": 2.0} if fastest == "wide" else {"wide": 2.0, "narrow": 1.0}
        choices[march] = kernel_trials.choose("test kernel", "--test_kernel", "auto", {"wide": 0, "narrow": 0}, "x",
                                              lambda timings=timings: timings, "a step", say=lambda line: None)
    assert choices == {"sapphirerapids": "wide", "haswell": "narrow"}
    remembered = json.loads((tmp_path / "gpt2zh" / "kernel_choices.json").read_text())
    assert len(remembered) == 2 and all("AMD EPYC" in key for key in remembered)
    notes = sorted((tmp_path / "gpt2zh").glob("decode_step-*.json"))
    assert len(notes) == 2 and len(builds) == 2 and len(set(loaded)) == 2
    assert {frozenset(json.loads(note.read_text())["features"]) for note in notes} == {zen4, zen3}

    # The Zen 3's build replaced by one made for the Zen 4 (a copied cache): compiled again, then loaded.
    zen3_note = next(note for note in notes if set(json.loads(note.read_text())["features"]) == zen3)
    zen3_note.write_text(json.dumps({"features": sorted(zen4), "openmp": True}))
    become("haswell")
    native_build.library()
    assert len(builds) == 3 and builds[-1] == zen3_note.with_suffix(".so") and loaded[-1] == str(builds[-1])
    assert set(json.loads(zen3_note.read_text())["features"]) == zen3

    # Asked to build for instruction sets this CPU lacks: refused in one line, nothing loaded.
    monkeypatch.setenv("GPT2ZH_MARCH", "sapphirerapids")
    native_build.building.cache_clear()
    from gpt2zh.errors import UserError

    with pytest.raises(UserError, match="which this CPU lacks; unset GPT2ZH_MARCH"):
        native_build.library()
    assert len(builds) == 3 and len(loaded) == 3
    native_build.building.cache_clear()


class FakeLibrary:
    def __getattr__(self, name):
        return self


def weights(folder):
    return load_file(folder / "final_model" / "model.safetensors")


def test_a_trial_never_changes_a_run(prepared, tmp_path):
    """The same command gives the same weights whether this machine times its attention kernels now or remembers
    them, and a first-ever run interrupted and resumed (the resumed process finding an empty cache, as on another
    machine) ends where the uninterrupted one does: trials draw from no random state the run uses, and the kernel a
    run chose goes into its checkpoint. (Two first-ever runs on a noisy machine may choose different kernels, which
    draw the dropout masks in other blocks: the interrupted run is then held against the uninterrupted one with its
    kernel.)"""
    config = prepared / "context_128.json"  # long enough for two attention-dropout kernels to be timed
    config.write_text((ROOT / "config" / "model_config_tiny.json").read_text().replace("32,", "128,"))
    flags = train_args(**{"--epochs": 2, "--batch_size": 2, "--log_step": 1, "--model_config": config,
                          "--stride": 64})
    caches = {name: {"XDG_CACHE_HOME": str(tmp_path / name)} for name in ("first", "second", "third")}
    measured = run("train.py", *flags, "--raw", "--output_dir", "measured", cwd=prepared, env=caches["first"]).stdout
    remembered = run("train.py", *flags, "--output_dir", "remembered", cwd=prepared, env=caches["first"]).stdout
    assert "measured now" in measured and "remembered in" in remembered
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags, "--output_dir", "interrupted"],
                               cwd=prepared, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **caches["second"]})
    interrupted = ""
    for line in process.stdout:
        interrupted += line
        if "step 5/" in line:
            process.send_signal(signal.SIGINT)
            break
    process.stdout.read()
    assert process.wait(timeout=300) == 130
    resumed = run("train.py", *flags, "--output_dir", "interrupted", "--resume", cwd=prepared,
                  env=caches["third"]).stdout
    assert "as the run being resumed chose" in resumed and "measured now" not in resumed
    chosen = [re.search(r"attention-dropout kernel: (blocked-\d+)", out).group(1) for out in (measured, interrupted)]
    uninterrupted = "measured"
    if chosen[0] != chosen[1]:  # "remembered" ran with chosen[0], so "measured" stays its reference
        uninterrupted = "uninterrupted"
        run("train.py", *flags, "--output_dir", uninterrupted, "--attention_kernel", chosen[1], cwd=prepared,
            env=caches["first"])
    for folder, reference in (("remembered", "measured"), ("interrupted", uninterrupted)):
        got, expected = weights(prepared / folder), weights(prepared / reference)
        assert all(torch.equal(got[name], expected[name]) for name in expected), (folder, reference, chosen)


def test_onednn_held_below_bf16_means_no_fast_bf16_even_where_torch_says_yes(monkeypatch):
    """A simulated AVX2 CPU on one with AVX512-BF16: torch still reports bf16 support, but oneDNN may not use it, so
    --precision auto must train in fp32 there (and --precision bf16 is refused)."""
    from gpt2zh.devices import autocast_dtype, bf16_supported
    from gpt2zh.errors import UserError

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert bf16_supported(cpu) and autocast_dtype(cpu, "auto", fp16=False) == torch.bfloat16
    for ceiling, fast in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True), ("ALL", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", ceiling)
        assert bf16_supported(cpu) == fast, ceiling
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert autocast_dtype(cpu, "auto", fp16=False) is None
    with pytest.raises(UserError, match="no fast bf16"):
        autocast_dtype(cpu, "bf16", fp16=False)

    # the ceiling is oneDNN's, on the CPU: a GPU beside it keeps its own answer (a CUDA card, an Apple GPU)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True, raising=False)
    assert bf16_supported(torch.device("cuda", 0)) and bf16_supported(torch.device("mps"))
    assert autocast_dtype(torch.device("cuda", 0), "auto", fp16=False) == torch.bfloat16


@pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= cpu_features(), reason="an x86 CPU with AVX2 to hold the run to")
def test_the_simulated_avx2_script_runs_the_command_as_on_an_avx2_cpu(tmp_path):
    """bench/simulated_avx2.py says what the command will see, then runs it with torch's kernels, oneDNN and the
    C++ step's build held to AVX2 (what a laptop without AVX-512 has), and returns its exit status."""
    probe = ("import os, torch; from gpt2zh.devices import autocast_dtype, machine_key; "
             "print('child:', torch.backends.cpu.get_cpu_capability(), autocast_dtype(torch.device('cpu'), 'auto', "
             "False), os.environ['GPT2ZH_MARCH'], 'onednn AVX2' in machine_key()); raise SystemExit(3)")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "simulated_avx2.py"), sys.executable, "-c", probe],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    seen, child = result.stdout.splitlines()[-2:]
    assert seen.startswith("simulated AVX2: torch kernels AVX2 | fast bf16 False | the C++ step built for"), seen
    if shutil.which(os.environ.get("CXX") or "c++"):
        assert "avx2" in seen and "avx512f" not in seen, seen
    assert child == "child: AVX2 None haswell True", child
