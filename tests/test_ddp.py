import shutil
import subprocess
import sys

import torch
from conftest import ROOT, run, train_args
from safetensors.torch import load_file

from gpt2zh.devices import distributed_device


def test_two_cpu_processes_train_like_one_with_twice_the_batch(prepared):
    """torchrun with 2 processes (gloo) takes the same steps as 1 process with a batch twice as large."""
    config = prepared / "no_dropout.json"
    text = (ROOT / "config" / "model_config_tiny.json").read_text()
    config.write_text(text.replace('"vocab_size"', '"attn_pdrop": 0, "embd_pdrop": 0, "resid_pdrop": 0, "vocab_size"'))
    common = {"--model_config": config, "--epochs": 1, "--stride": 16}
    run("train.py", *train_args(**common, **{"--batch_size": 4}), "--raw", "--output_dir", "single", cwd=prepared)
    torchrun = shutil.which("torchrun") or sys.executable + " -m torch.distributed.run"
    result = subprocess.run([*torchrun.split(), "--nproc_per_node", "2", str(ROOT / "train.py"),
                             *train_args(**common, **{"--batch_size": 2}), "--output_dir", "ddp"],
                            cwd=prepared, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "device: 2 processes (DistributedDataParallel, cpu)" in result.stdout
    single = load_file(prepared / "single" / "final_model" / "model.safetensors")
    ddp = load_file(prepared / "ddp" / "final_model" / "model.safetensors")
    for name in single:
        assert (single[name] - ddp[name]).abs().max() < 1e-5, name


def test_torchrun_processes_keep_to_the_cpu_when_device_cpu_is_asked_even_beside_gpus(monkeypatch):
    """torchrun with --device cpu on a machine with GPUs: every process keeps to the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert str(distributed_device("cpu", 1)) == "cpu"
    assert str(distributed_device("0,1", 1)) == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert str(distributed_device("0,1", 1)) == "cpu"
