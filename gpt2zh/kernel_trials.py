"""Kernels whose speed differs between machines (an AMD Zen 4 without AMX and an Intel Xeon with AMX rank them
differently), chosen by a short timed trial on the actual shapes and remembered per machine."""
import json

import torch

from .devices import machine_key
from .errors import UserError
from .fileio import cache_dir, write_json_atomic

SHOWN = 4  # timings named in the printed line, fastest first


def choices_file():
    """Where the measured choices are remembered: one entry per kind of kernel, machine (CPU and instruction sets:
    devices.machine_key), thread count, torch version and shape."""
    return cache_dir() / "kernel_choices.json"


def choose(what, flag, forced, candidates, shape, measure, unit, say=print):
    """The candidate `forced` names, or with "auto" the fastest of `candidates` here: `measure()` returns
    {name: seconds} for the candidates it timed (all, or those a search reached) on the shapes `shape` describes,
    once per machine; later runs read the file, and measure again when the candidates changed."""
    if forced != "auto":
        if forced not in candidates:
            raise UserError(f"{flag} {forced}: not one of: auto, {', '.join(candidates)}")
        say(f"{what}: {forced} (as asked)")
        return forced
    if len(candidates) == 1:
        return next(iter(candidates))
    key = f"{what} | {machine_key()} | {torch.get_num_threads()} threads | torch {torch.__version__} | {shape}"
    path = choices_file()
    try:
        remembered = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        remembered = {}
    entry = remembered.get(key)
    if entry is None or entry.get("candidates") != sorted(candidates):
        with torch.random.fork_rng(devices=[]):  # a trial draws random inputs: the run's own draws stay as they were
            timings = measure()
        entry = {"choice": min(timings, key=timings.get), "ms": {k: round(v * 1e3, 2) for k, v in timings.items()},
                 "candidates": sorted(candidates)}
        remembered[key] = entry
        try:
            write_json_atomic(path, remembered)
        except OSError:
            pass  # a read-only home: measured again next time
        how = "measured now"
    else:
        how = f"measured before, remembered in {path}"
    # fastest first; among timings equal once rounded, the choice (the fastest unrounded) leads
    ranked = sorted(entry["ms"].items(), key=lambda item: (item[1], item[0] != entry["choice"]))
    timings = ", ".join(f"{name} {ms} ms" for name, ms in ranked[:SHOWN])
    if len(ranked) > SHOWN:  # the line stays short; the file has them all
        timings += f", … {len(ranked) - SHOWN} more up to {ranked[-1][1]} ms"
    alone = len(ranked) == 1  # the others left out: measured to lose on CPUs of this kind, or unable to run here
    say(f"{what}: {entry['choice']}{'' if alone else ', the fastest here'} ({how}: {timings} {unit}"
        f"{', the only one timed here' if alone else ''}; {flag} chooses another)")
    return entry["choice"]
