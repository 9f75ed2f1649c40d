import os
import shutil
import subprocess
import sys

import pytest
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


def test_two_torchrun_nodes_train_like_one_node_of_two_processes_and_resume_needs_as_many(prepared):
    """Several machines: two torchrun "nodes" on 127.0.0.1 (c10d rendezvous, gloo, one process each) take the same
    steps, with the same losses and weights, as one node of two processes; each node's first process tokenizes
    (both write the same folder here, as machines sharing a disk would). Resuming with another number of processes
    stops with one line."""
    import json
    import os
    import socket

    flags = train_args(**{"--epochs": 1, "--stride": 16, "--batch_size": 2, "--log_step": 1})
    torchrun = (shutil.which("torchrun") or sys.executable + " -m torch.distributed.run").split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default with several processes on a node
    single = subprocess.run([*torchrun, "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"), *flags,
                             "--raw", "--output_dir", "one_node"], cwd=prepared, capture_output=True, text=True,
                            timeout=600, env=env)
    assert single.returncode == 0, single.stdout + single.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([*torchrun, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "test",
                               str(ROOT / "train.py"), *flags, "--raw", "--output_dir", "two_nodes"], cwd=prepared,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs

    def losses(folder):
        rows = [json.loads(line) for line in (prepared / folder / "metrics.jsonl").read_text().splitlines()]
        return [(row["step"], row["train_loss"]) for row in rows if "train_loss" in row]

    assert losses("one_node") == losses("two_nodes") and len(losses("one_node")) >= 5
    one = load_file(prepared / "one_node" / "final_model" / "model.safetensors")
    two = load_file(prepared / "two_nodes" / "final_model" / "model.safetensors")
    assert all(torch.equal(one[name], two[name]) for name in one)
    resumed = run("train.py", *flags, "--output_dir", "two_nodes", "--resume", cwd=prepared, check=False)
    assert resumed.returncode == 2
    assert "--resume: the run being resumed trained in 2 process(es)" in resumed.stderr
    assert "Traceback" not in resumed.stderr


@pytest.mark.parametrize(("budget", "schedule"), [(0.4, "wsd"), (0.15, "cosine")],
                         ids=["fixed from the measured speed, then again (wsd)", "ended on the first estimate"])
def test_torchrun_processes_whose_clocks_differ_agree_on_the_time_budgets_steps(prepared, tmp_path, budget, schedule):
    """--time_budget under torchrun: each process's clock starts at its own moment, and one whose clock reads later
    would fit fewer steps; the processes agree on one number (the fewest) and stop together, whether it was fixed
    from the measured speed and again at each epoch's end (wsd: a process that refits alone leaves the other
    waiting in the next step's all-reduce; the first fit is the same for every schedule), or, in a budget too short
    to measure it, from the first estimate (the preset's test, resumed, crashed there). Rank 1's clock is made to
    read 8 s later (a sitecustomize in its PYTHONPATH)."""
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import gpt2zh.run_clock as clock\n"
        "    elapsed = clock.RunClock.elapsed\n"
        "    clock.RunClock.elapsed = lambda self: elapsed(self) + 8\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(patch), str(ROOT)])}
    torchrun = shutil.which("torchrun") or sys.executable + " -m torch.distributed.run"
    result = subprocess.run([*torchrun.split(), "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
                             *train_args(**{"--epochs": 10000, "--stride": 16, "--batch_size": 2,
                                            "--time_budget": budget, "--lr_schedule": schedule}),
                             "--raw", "--output_dir", "budget"],
                            cwd=prepared, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (prepared / "budget" / "final_model" / "model.safetensors").exists()
    if schedule == "wsd":
        assert "fixed again" in result.stdout + result.stderr, result.stdout[-3000:] + result.stderr[-3000:]
