"""The optimizer, its learning-rate schedule and the running weight average of a training run."""
import copy
import math

import torch

ADAM_EPS = 1e-6  # the original's (transformers' old AdamW default); torch's default is 1e-8


def make_optimizers(model, args, device, fast_bf16, rank=0, world=1):
    """[AdamW] (--optimizer adamw), or [AdamW, Muon] (--optimizer muon: Muon for the transformer blocks' weight
    matrices, AdamW for the embeddings, output layer, biases and layer norms). AdamW decays the matrices only
    (--weight_decay); each group keeps its peak learning rate as "peak_lr"."""
    blocks = model.transformer.h
    muon = [p for p in blocks.parameters() if p.ndim == 2] if args.optimizer == "muon" else []
    taken = {id(p) for p in muon}
    rest = [p for p in model.parameters() if id(p) not in taken]
    decay, no_decay = [p for p in rest if p.ndim >= 2], [p for p in rest if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay, "peak_lr": args.lr},
              {"params": no_decay, "weight_decay": 0.0, "peak_lr": args.lr}]
    optimizers = [torch.optim.AdamW(groups, lr=args.lr, eps=ADAM_EPS, fused=device.type in ("cpu", "cuda"))]
    if muon:
        muon_lr = args.muon_lr or args.lr
        optimizers.append(Muon([{"params": muon, "peak_lr": muon_lr}], muon_lr, args.weight_decay,
                               torch.bfloat16 if fast_bf16 else torch.float32, rank, world))
    return optimizers


def orthogonalize(matrix, coefficients, steps, eps, dtype):
    """Newton-Schulz iteration towards the nearest semi-orthogonal matrix, in `dtype` (torch's Muon's, which always
    computes in bf16)."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    if matrix.size(0) > matrix.size(1):
        x = x.T  # wide: the Gram matrices are the smaller side squared
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if matrix.size(0) > matrix.size(1) else x).to(matrix.dtype)


class Muon(torch.optim.Muon):
    """torch's Muon (Nesterov momentum, Newton-Schulz orthogonalization, decoupled weight decay, learning rates
    scaled to match AdamW's update size), with its step written here for two reasons:
    - torch orthogonalizes in bf16 always, which CPUs without AVX512-BF16 or AMX emulate: 0.65 s for one 320 x 960
      matrix on an AMD Zen 3, 9x its fp32 time; here the dtype is the machine's fast one;
    - under torchrun every process would orthogonalize every matrix; here each takes its share (matrix i goes to
      process i mod world) and hands the result to the others, so two processes split the work.
    The state (momentum buffers) is torch's, kept in full by every process."""

    def __init__(self, params, lr, weight_decay, dtype, rank=0, world=1):
        super().__init__(params, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        self.dtype, self.rank, self.world = dtype, rank, world

    @torch.no_grad()
    def step(self, closure=None):
        todo = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        updates = []
        for i, (group, p) in enumerate(todo):
            buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buffer.lerp_(p.grad, 1 - group["momentum"])
            if i % self.world == self.rank:
                update = p.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                updates.append(orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                             self.dtype))
            else:
                updates.append(torch.empty_like(p))
        if self.world > 1:
            for work in [torch.distributed.broadcast(update, i % self.world, async_op=True)
                         for i, update in enumerate(updates)]:
                work.wait()
        for (group, p), update in zip(todo, updates, strict=True):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))  # torch's "match_rms_adamw"


WSD_DECAY_SHARE = 0.2  # --lr_schedule wsd decays over this share of the steps after warm-up


def lr_factor(step, warmup_steps, total_steps, schedule):
    """The share of the peak learning rate for optimizer step `step` (from 0): linear warm-up over `warmup_steps`,
    then linear or cosine decay to 0 at `total_steps` (transformers' get_linear/cosine_schedule_with_warmup), or
    "wsd" (warm-up, stable, decay): the peak held, then a linear decay to 0 over the last WSD_DECAY_SHARE of the
    steps after warm-up. A function of the step alone: a run whose length is fixed after it started
    (--time_budget), or that is resumed, follows it without a scheduler's state."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    decay_steps = total_steps - warmup_steps
    if schedule == "cosine":
        progress = float(step - warmup_steps) / float(max(1, decay_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "wsd":
        decay_steps = total_steps - wsd_decay_start(warmup_steps, total_steps)
    return min(1.0, max(0.0, float(total_steps - step) / float(max(1, decay_steps))))


def wsd_decay_start(warmup_steps, total_steps):
    """The step at which --lr_schedule wsd leaves its peak: before it, the learning rate does not depend on
    `total_steps`."""
    return total_steps - int(WSD_DECAY_SHARE * (total_steps - warmup_steps))


def set_learning_rate(optimizers, factor):
    """Every group's learning rate to `factor` times its peak."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor


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
