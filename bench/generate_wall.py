"""What a user waits for: generate.py's whole command (start-up, kernel trial, prefix, sampling, printing) for the
seed config (82M, random weights saved as a model folder once), against the memory roofline measured in this run.

- 1 x 1000 and 10 x 1000 tokens (the reference command's shape), each as a first run on a machine (an empty cache:
  the C++ step's build and the kernel trial included) and with the choice remembered, alternating;
- what each command spends outside sampling (its wall less the sampling time it prints): what a first run adds,
  apart from the sampling's own spread from run to run;
- time to the first generated character on the screen (1 row);
- whether the trial predicts the run: the chosen kernel's steps over a 1000-token run of the seed config (timed one
  by one, in this process, with the choice a first run above remembered) against the step time that trial measured;
- the roofline: the bytes the decode steps must read at least (bf16 weights + bf16 cache, generate_speed.py's
  count) over the read bandwidth (x.sum() over 1 GiB, the median of readings before and after each command of the
  shape: this VM's readings moved between 26 and 57 GB/s within minutes); and the same with int8 weights and cache
  (the int8-cpp kernel's bytes), beside it.
Run from the project root: python bench/generate_wall.py [--repeats 2]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, read_bandwidth  # noqa: E402
from generate_speed import roofline  # noqa: E402

PREFIX = "[CLS]悟空大喝一声"


def seed_model_folder(folder):
    """The seed config with random weights, saved as train.py saves a model."""
    import torch

    from gpt2zh.checkpoints import record_vocabulary, save_model_folder
    from gpt2zh.model import build_model, load_config
    from gpt2zh.vocab import load_tokenizer

    torch.manual_seed(0)
    model = build_model(load_config(ROOT / "config" / "model_config_small.json")).eval()
    tokenizer = load_tokenizer(ROOT / "cache" / "vocab_small.txt")
    record_vocabulary(model, tokenizer)
    save_model_folder(model, tokenizer, folder)
    return model


def timed_command(folder, rows, length, cache):
    """(wall seconds, seconds to the first generated character or None, seconds before and after sampling) of one
    generate.py command: the last is the wall less the sampling time it prints (start-up, build, trial, exit), what
    a first run adds without the sampling's spread from run to run."""
    command = [sys.executable, str(ROOT / "generate.py"), "--model_path", str(folder), "--device", "cpu",
               "--length", str(length), "--nsamples", str(rows), "--topp", "1", "--prefix", PREFIX, "--seed", "1"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env={**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONUNBUFFERED": "1"})
    first, seen = None, b""
    while chunk := process.stdout.read1(4096):
        seen += chunk
        if first is None and rows == 1 and "悟空大喝一声".encode() in seen.split(b"SAMPLE 1")[-1]:
            after = seen.split("悟空大喝一声".encode())[-1]
            if after.strip():  # a character past the prefix
                first = time.perf_counter() - start
    process.wait()
    wall = time.perf_counter() - start
    sampling = re.search(rb"tokens in ([\d.]+) s", seen)
    return wall, first, wall - float(sampling[1]) if sampling else float("nan")


def trial_against_run(folder, rows, length, cache):
    """(the kernel a first run chose with `cache`, the step it measured, the mean of its steps over a run of
    `length` tokens): the run in this process, each step timed."""
    import json

    import torch

    from gpt2zh.kernel_trials import choices_file
    from gpt2zh.sampling import Writer

    os.environ["XDG_CACHE_HOME"] = str(cache)  # the first run's build and trial, remembered
    writer = Writer(folder, device=torch.device("cpu"), rows=rows, say=lambda line: None)
    step = writer.decode_step(rows)
    remembered = json.loads(choices_file().read_text(encoding="utf-8"))
    entry = next(entry for key, entry in remembered.items() if f"| {rows} rows," in key)
    steps = []

    def timed(ids, layers):
        start = time.perf_counter()
        logits = step(ids, layers)
        steps.append(time.perf_counter() - start)
        return logits

    timed.kernel, timed.threads = step.kernel, step.threads
    writer.steps[rows] = timed
    tokenizer = writer.tokenizer
    prefix = [tokenizer.convert_tokens_to_ids("[CLS]"), *map(tokenizer.convert_tokens_to_ids, PREFIX[5:])]
    writer.write(prefix, length, rows, writer.processors(1.0, 8, 1.0, 1.0), seed=1)
    return entry["choice"], entry["ms"][entry["choice"]] / 1e3, sum(steps) / len(steps)


def report(rows, length, first_runs, remembered, needed, int8_needed, bandwidth):
    """The runs of one shape against the roofline: `needed` bytes (`int8_needed` with int8 weights and cache) at
    `bandwidth` bytes a second."""
    limit, int8_limit = needed / bandwidth, int8_needed / bandwidth
    walls, first_walls = [run[0] for run in remembered], [run[0] for run in first_runs]
    print(f"{rows} x {length}: first run {listed(first_walls)} s, remembered {listed(walls)} s; roofline {limit:.1f} s "
          f"({needed / 1e9:.0f} GB at {bandwidth / 1e9:.0f} GB/s): remembered {min(walls) / limit:.2f}x, first run "
          f"{min(first_walls) / limit:.2f}x the roofline (with int8 weights and cache, {int8_limit:.1f} s: "
          f"{min(walls) / int8_limit:.2f}x, {min(first_walls) / int8_limit:.2f}x)")
    outside_first, outside = [run[2] for run in first_runs], [run[2] for run in remembered]
    print(f"  outside sampling (start-up, build, trial, exit): first run {listed(outside_first)} s, remembered "
          f"{listed(outside)} s: a first run adds {median(outside_first) - median(outside):.1f} s (medians)")
    if rows == 1:
        print(f"  first generated character on the screen: first run {listed(run[1] for run in first_runs)} s, "
              f"remembered {listed(run[1] for run in remembered)} s after the command started")


def listed(seconds):
    return ", ".join("-" if value is None else f"{value:.1f}" for value in seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2,
                        help="first runs (each with an empty cache) and runs with the choice remembered, alternating")
    parser.add_argument("--length", type=int, default=1000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="gpt2zh-wall-"))
    model = seed_model_folder(work / "seed_model")
    for rows in (1, 10):
        first_runs, remembered, readings = [], [], [read_bandwidth(repeats=3)]
        for repeat in range(args.repeats):
            cache = work / f"cache-{rows}-{repeat}"  # empty: the first run builds the C++ step and runs the trial
            first_runs.append(timed_command(work / "seed_model", rows, args.length, cache))
            readings.append(read_bandwidth(repeats=3))
            remembered.append(timed_command(work / "seed_model", rows, args.length, cache))
            readings.append(read_bandwidth(repeats=3))
        needed, _ = roofline(model, rows, 8, args.length)
        int8_needed, _ = roofline(model, rows, 8, args.length, int8=True)
        report(rows, args.length, first_runs, remembered, needed, int8_needed, median(readings))
        print(f"  bandwidth read before and after each command: {', '.join(f'{r / 1e9:.0f}' for r in readings)} GB/s")
        kernel, trial, run = trial_against_run(work / "seed_model", rows, args.length, work / f"cache-{rows}-0")
        print(f"  the trial's prediction: {kernel} {trial * 1e3:.2f} ms a step; its steps over a run of "
              f"{args.length} tokens {run * 1e3:.2f} ms: {run / trial:.2f}x the trial's")


if __name__ == "__main__":
    main()
