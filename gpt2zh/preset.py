"""The CPU preset (cpu_preset.py): a novel to a trained model, its held-out loss and ten scored samples in a fixed
time on whatever CPU runs it. The model's size and recipe come from this machine's measured speed; every stage
leaves its files, so the same command run again skips what is done and continues training from its checkpoint."""
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError
from .fileio import write_json_atomic
from .text import find_txt_files, read_novel, split_articles

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_NOVEL = ROOT / "examples" / "sample_novel.txt"
WHERE_TO_GET_A_NOVEL = ("a public-domain novel, e.g. 《西游记》 from Chinese Wikisource "
                        "(zh.wikisource.org/wiki/西遊記) or Project Gutenberg "
                        "(gutenberg.org/ebooks/search/?query=西遊記), saved as UTF-8 .txt in data/")
AFTER_TRAINING = 90  # seconds kept for eval.py, generate.py and score_samples.py (about 30 s on 2 cores)
# generate.py's flags for the preset's samples: 10 continuations of 1000 characters of one prefix, scored after
SAMPLE_FLAGS = ("--length", "1000", "--nsamples", "10", "--prefix", "[CLS]却说那大圣", "--topk", "40", "--topp", "1",
                "--temperature", "1.0", "--repetition_penalty", "1.5", "--repetition_window", "32")


@dataclass(frozen=True)
class Recipe:
    """A model size and how it is trained: one row of the table RECIPES."""
    name: str
    config: str  # under config/
    flags: tuple  # train.py's flags beyond the preset's common ones
    epochs: int  # at most (the time budget decides)


# Which recipe gives the lowest held-out loss for the time a machine has, measured on 《西游记》 (chapters 96-100 held
# out; docs/BENCHMARKS.md, "The CPU preset's recipe by speed"): a machine is given the first row whose `tokens` the
# reference model (config/model_config_cpu.json) would see in the budget at the speed the probe measures. The probe
# (one process, the other cores idle) reads about 1.4x what the two training processes reach: on an AVX2 CPU it said
# 5.6M tokens where training would see 3.7M, and there the 4 x 256 model, 1.85x as fast, ends 0.07 lower than
# 4 x 320, with half the input noise 0.03 lower again, with its windows shifted each epoch (--shift_windows) about
# 0.03 lower still, and holding its peak learning rate until a last fifth of decay (--lr_schedule wsd) 0.04-0.07
# lower than a cosine; an AVX512-BF16 CPU trains 4 x 320 on 8.4-9M tokens, its probe above that: 4.450 with input
# noise 0.1 and a cosine, 4.373-4.387 (seeds 2 and 1) with the same three changes.
RECIPES = (
    (7.5e6, Recipe("4 x 320, input noise 0.05, shifted windows, wsd", "model_config_cpu.json",
                   ("--input_noise", "0.05", "--shift_windows", "--lr_schedule", "wsd"), 12)),
    (0.0, Recipe("4 x 256, input noise 0.05, shifted windows, wsd", "model_config_cpu_small.json",
                 ("--input_noise", "0.05", "--shift_windows", "--lr_schedule", "wsd"), 12)),
)
REFERENCE_CONFIG = "model_config_cpu.json"


def cores():
    """CPU cores this process may run on (taskset and containers narrow os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def training_processes(available):
    """(processes, threads each): on Linux with 2 or more cores two processes of half the cores (on 2 cores two
    1-thread processes train faster than one of 2 threads, docs/BENCHMARKS.md), otherwise one process."""
    if platform.system() == "Linux" and available >= 2:
        return 2, available // 2
    return 1, available


def tokens_per_second(config_path, processes, threads, batch_size, seconds=4.0):
    """Training tokens a second of the model `config_path` on this machine: optimizer steps of `batch_size` windows
    timed in this process with `threads` threads, times the processes that run side by side on these cores."""
    import torch

    from .devices import autocast_dtype
    from .model import CausalLMLoss, build_model, context_length, load_config

    torch.set_num_threads(threads)
    config = load_config(config_path)
    model = build_model(config).train()
    loss = CausalLMLoss(model, autocast_dtype(torch.device("cpu"), "auto", fp16=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = torch.randint(0, config.vocab_size, (batch_size, context_length(config)))
    steps, start = -1, 0.0
    while steps < 2 or time.perf_counter() - start < seconds:
        if steps == 0:
            start = time.perf_counter()  # after one warm-up step
        loss(batch, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    side_by_side = min(processes, max(1, cores() // threads))
    return steps * batch.numel() / (time.perf_counter() - start) * side_by_side


def choose_recipe(train_seconds, speed):
    """The table's recipe for the tokens `speed` (reference model's tokens a second) buys in `train_seconds`."""
    tokens = speed * train_seconds
    return next(recipe for least, recipe in RECIPES if tokens >= least), tokens


@dataclass
class PresetState:
    """model/cpu_preset/preset.json: the novel, the recipe chosen, the stages done and when the run started (a
    rerun of the same command goes on from there; another novel or seed starts anew)."""
    novel_sha256: str
    seed: int
    minutes: float
    recipe: str = ""
    started: float = 0.0
    budget: float = 0.0  # train.py's --time_budget, minutes (a resumed run is given the same)
    done: tuple = ()

    @classmethod
    def load(cls, path):
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def save(self, path):
        write_json_atomic(path, {**asdict(self), "done": list(self.done)})


def novel_files(novel, say):
    """The novel to train on: the file given, else the .txt novels in data/, else the project's small sample."""
    if novel:
        if not Path(novel).is_file():
            raise UserError(f"{novel}: no such file; give the novel's .txt file ({WHERE_TO_GET_A_NOVEL})")
        return [Path(novel)]
    data = Path("data")
    try:
        return find_txt_files([data], say=lambda line: None)
    except UserError:
        say(f"no novel in {data}: training on the project's own small sample {SAMPLE_NOVEL.name}, a demonstration "
            f"(for a real model put {WHERE_TO_GET_A_NOVEL})")
        return [SAMPLE_NOVEL]


def fingerprint(files):
    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def held_out_articles(files):
    """How many of the last articles to hold out: 5 (chapters 96-100 of 《西游记》), fewer for a short novel."""
    articles = sum(len(split_articles(read_novel(path)[0])) for path in files)
    return max(1, min(5, articles // 10))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_script(script, args, processes=1, threads=None):
    """A project script run as a user would (sys.executable, in this folder); a failure ends the preset. With several
    `processes`, one torch.distributed run of them (what `torchrun --standalone` sets up, without its page of
    traceback when a process stops): the first prints, the others are quiet. Ctrl-C reaches the scripts from the
    terminal (train.py saves a checkpoint and stops) and the preset waits for them; SIGTERM is passed on."""
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if processes > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(processes),
                   LOCAL_WORLD_SIZE=str(processes))
    workers = [subprocess.Popen(command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)} if processes > 1
                                else env, stdout=None if rank == 0 else subprocess.DEVNULL)
               for rank in range(processes)]
    status = wait_for(workers)
    if status != 0:
        raise UserError(f"`python {script} {' '.join(map(str, args))}` stopped (exit status {status}); see above. "
                        f"Run the same command again to continue from where it stopped")


def wait_for(workers, grace=60):
    """The first non-zero exit status of `workers` (0 if none): when one fails, the others get `grace` seconds to
    stop (they would wait for it for ever) before they are ended."""
    forward = signal.signal(signal.SIGTERM, lambda signum, frame: [w.send_signal(signal.SIGTERM) for w in workers])
    failed_at = None
    try:
        while any(w.poll() is None for w in workers):
            try:
                time.sleep(0.2)
            except KeyboardInterrupt:
                continue  # the scripts got the same Ctrl-C and are stopping
            if failed_at is None and any(w.poll() for w in workers):
                failed_at = time.time()
            if failed_at is not None and time.time() - failed_at > grace:
                for worker in workers:
                    worker.kill()
    finally:
        signal.signal(signal.SIGTERM, forward)
    return next((w.returncode for w in workers if w.returncode), 0)
