"""The optimizer, its learning-rate schedule and the running weight average of a training run."""
import copy
import math

import torch

ADAM_EPS = 1e-6  # the original's (transformers' old AdamW default); torch's default is 1e-8


def make_optimizer(model, args, device):
    """AdamW with --weight_decay on the matrices only; each group keeps its peak learning rate as "peak_lr"."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay, "peak_lr": args.lr},
              {"params": no_decay, "weight_decay": 0.0, "peak_lr": args.lr}]
    return torch.optim.AdamW(groups, lr=args.lr, eps=ADAM_EPS, fused=device.type in ("cpu", "cuda"))


def lr_factor(step, warmup_steps, total_steps, schedule):
    """The share of the peak learning rate for optimizer step `step` (from 0): linear warm-up over `warmup_steps`,
    then linear or cosine decay to 0 at `total_steps` (transformers' get_linear/cosine_schedule_with_warmup).
    A function of the step alone: a run whose length is fixed after it started (--time_budget), or that is
    resumed, follows it without a scheduler's state."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if schedule == "cosine":
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def set_learning_rate(optimizer, factor):
    """Every group's learning rate to `factor` times its peak; returns the first group's."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
    return optimizer.param_groups[0]["lr"]


class WeightAverage:
    """A running uniform average of a model's weights from some step on (stochastic weight averaging), kept in
    fp32 in a copy of the model that can be evaluated and saved. Updated without reading anything back from the
    GPU (torch's AveragedModel checks its count on the device every step)."""

    def __init__(self, lm):
        self.model = copy.deepcopy(lm).requires_grad_(False)
        self.averaged = list(self.model.parameters())  # the same tensors for the whole run (loading copies into them)
        self.count = 0

    def update(self, lm):
        self.count += 1
        torch._foreach_lerp_(self.averaged, [p.detach() for p in lm.parameters()], 1 / self.count)

    def state_dict(self):
        return {"count": self.count, "weights": self.model.state_dict()}

    def load_state_dict(self, state):
        self.count = state["count"]
        self.model.load_state_dict(state["weights"])
