"""Shared by the benchmarks: train.py's training step, the machine's measured matmul peak, and a one-line
machine description."""
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2zh.devices import cpu_name  # noqa: E402
from gpt2zh.model import CausalLMLoss, build_model, choose_dropout_attention, count_parameters  # noqa: E402


def flops_per_token(model):
    """Training FLOPs a token as nanoGPT counts them: 6 a parameter (position embeddings left out) plus
    attention's 12 x layers x width x context."""
    config = model.config
    params = count_parameters(model) - model.transformer.wpe.weight.numel()
    return 6 * params + 12 * config.n_layer * config.n_embd * config.n_ctx


def our_recipe(config, attn_dropout, compile_model, device="cpu", batch_size=1):
    """What train.py does: bf16 autocast, blocked attention with cheap dropout (CPU; its query block chosen by
    train.py's trial), fused loss, fused AdamW, gradient clipping. Returns the model and a function doing one
    optimizer step on a batch of token ids."""
    device = torch.device(device)
    model = build_model(config, attn_dropout=attn_dropout).to(device).train()
    if attn_dropout and device.type == "cpu":
        choose_dropout_attention(model, batch_size, torch.bfloat16)
    loss_fn = CausalLMLoss(model, torch.bfloat16)
    if compile_model:
        loss_fn = torch.compile(loss_fn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(batch):
        loss_fn(batch, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, step


def matmul_peak(dtype, size=2048, repeats=5, device="cpu"):
    """FLOP/s of a size^3 matmul in `dtype` on `device`, best of `repeats`."""
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def read_bandwidth(gib=1, repeats=5):
    """Bytes a second that x.sum() reads over `gib` GiB of fp32, best of `repeats`: the memory roofline."""
    x = torch.ones(gib * 2**28, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def machine():
    return (f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{torch.backends.cpu.get_cpu_capability()}, Python {platform.python_version()}")
