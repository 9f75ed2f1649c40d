"""How long a training run takes: a first estimate from one window timed before the loop, the speed measured over
the first steps (and, for --time_budget, the number of steps that fits the budget), and the whole run's ETA."""
import math
import time

import torch

MEASURE_SECONDS = 10  # the speed is measured over at least this long ...
MEASURE_STEPS = 3  # ... and this many steps, after the first (allocations, kernel set-up)
MEASURE_MAX_STEPS = 50  # ... or stops after this many
BUDGET_MARGIN = 0.04  # of the budget, kept for what the measurement cannot see (a busier machine later)


def duration(seconds):
    """'2 h 05 min', '12 min', '1 min 25 s', '40 s'."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 600:
        return f"{round(seconds / 60)} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{round(seconds)} s"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_one_window(trained, batch, device):
    """Seconds of one forward and backward pass over `batch` [(input_ids, labels)] of `trained` (unwrapped: no
    gradient exchange), the random generators and the gradients left as they were: the run is not changed by it.
    The second of two passes is timed: a GPU's first pass sets up its libraries and kernels (on an H200, four runs
    starting together timed 50-80 s for it, for a step of about a tenth of a second)."""
    from .checkpoints import rng_states, set_rng_states

    states = rng_states()
    try:
        for _ in range(2):
            set_rng_states(states)
            start = time.perf_counter()
            trained(*batch).mean().backward()
            synchronize(device)
        return time.perf_counter() - start
    finally:
        set_rng_states(states)
        for parameter in trained.parameters():
            parameter.grad = None


def seconds_a_step(mark, global_step):
    """Seconds a step since `mark`, a (time, step) pair (None without a step since)."""
    steps = global_step - mark[1]
    return (time.perf_counter() - mark[0]) / steps if steps > 0 else None


class RunClock:
    """The run's time: started at train.py's start; `step_seconds` once measured over the first steps of this
    process (None before); `epoch_seconds`, what an epoch's end costs (held-out loss, saves); with `budget`
    seconds, the number of steps that ends the run inside it."""

    def __init__(self, started, budget_minutes=0.0):
        self.started = started
        self.budget = budget_minutes * 60 if budget_minutes else None
        self.step_seconds = None
        self.estimate = None  # seconds a step, from one window timed before the first
        self.epoch_seconds = 0.0
        self.first = None  # (time, step) the measurement started from
        self.fitted_here = False  # this process fixed --time_budget's steps (a resumed one keeps what it was given)
        self.since = None  # (time, step) the current epoch's steps are timed from, for refit_to_budget

    def elapsed(self):
        return time.time() - self.started

    def ready(self, global_step, last_chance=False):
        """Call after every step until the speed is known: whether it can be fixed now, after MEASURE_SECONDS and
        MEASURE_STEPS, after MEASURE_MAX_STEPS, or at `last_chance`. The first step of the process (allocations,
        kernel set-up) is not counted."""
        if self.first is None:
            self.first = (time.perf_counter(), global_step)
            return last_chance
        seconds, steps = time.perf_counter() - self.first[0], global_step - self.first[1]
        return (seconds >= MEASURE_SECONDS and steps >= MEASURE_STEPS) or steps >= MEASURE_MAX_STEPS or last_chance

    def fix_speed(self, global_step):
        """`step_seconds` from the steps timed since the first (the estimate if none were)."""
        self.step_seconds = seconds_a_step(self.first, global_step) or self.estimate  # `first`: set by ready()

    def time_steps_from(self, global_step):
        self.since = (time.perf_counter(), global_step)

    def seconds_a_step_since(self, global_step):
        """Seconds a step since time_steps_from() (None without a step)."""
        return seconds_a_step(self.since, global_step)

    def steps_in_budget(self, steps_done, step_seconds, steps_per_epoch):
        """The whole run's steps for --time_budget: those taken, and as many more as fit in what is left of the
        budget after the margin, an epoch's end counted every `steps_per_epoch` steps and once more at the end."""
        left = self.budget * (1 - BUDGET_MARGIN) - self.elapsed() - self.epoch_seconds
        per_step = step_seconds + self.epoch_seconds / steps_per_epoch
        return steps_done + max(1, math.floor(left / per_step))

    def eta(self, steps_left, epochs_left):
        return steps_left * (self.step_seconds or 0.0) + epochs_left * self.epoch_seconds
