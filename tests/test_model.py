import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY_CONFIG
from gpt2zh.model import (CausalLMLoss, LinearCrossEntropy, blocked_causal_attention, build_model, count_parameters,
                          dropout_mask, load_config)


def test_seed_config_has_the_seed_parameter_count():
    config = load_config(ROOT / "config" / "model_config_small.json")
    assert (config.n_ctx, config.n_embd, config.n_head, config.n_layer, config.vocab_size) == (1024, 768, 12, 10, 13317)
    with torch.device("meta"):
        model = build_model(config)
    assert count_parameters(model) == 81894144


def test_dropout_mask_keeps_the_right_share():
    keep, keep_prob = dropout_mask((2000, 1000), 0.1)
    assert abs(keep_prob - 0.9) < 1e-4
    assert abs(keep.float().mean().item() - keep_prob) < 2e-3


def reference_attention(q, k, v, keep, keep_prob):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(scores, -1) * keep / keep_prob) @ v


def test_blocked_attention_is_causal_attention_with_dropout(monkeypatch):
    import gpt2zh.model as model_module

    monkeypatch.setattr(model_module, "QUERY_BLOCK", 16)
    q, k, v = (torch.randn(2, 3, 40, 8, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(0)
    out = blocked_causal_attention(q, k, v, 0.2, 8 ** -0.5)
    torch.manual_seed(0)  # redraw the same per-block masks into one full mask
    full = torch.zeros(2, 3, 40, 40, dtype=torch.bool)
    for start in range(0, 40, 16):
        end = min(start + 16, 40)
        full[:, :, start:end, :end], keep_prob = dropout_mask((2, 3, end - start, end), 0.2)
    torch.testing.assert_close(out, reference_attention(q, k, v, full, keep_prob))
    no_dropout = blocked_causal_attention(q, k, v, 0.0, 8 ** -0.5)
    torch.testing.assert_close(no_dropout, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_linear_cross_entropy_matches_torch():
    hidden = torch.randn(70, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (70,))
    labels[::5] = -100
    loss = LinearCrossEntropy.apply(hidden, weight, labels, 32)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_fast_path_loss_matches_the_plain_fp32_model():
    """bf16 autocast + blocked attention + our loss against transformers' fp32 eager path, same weights."""
    from transformers import GPT2LMHeadModel

    config = load_config(TINY_CONFIG)
    config.attn_pdrop = config.resid_pdrop = config.embd_pdrop = 0.0
    torch.manual_seed(0)
    fast = build_model(config)
    plain = GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    plain.load_state_dict(fast.state_dict())
    batch = torch.randint(5, 13317, (4, 32))
    expected = plain(input_ids=batch, labels=batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = CausalLMLoss(fast)(batch, batch)
    assert abs(got.item() - expected.item()) < 0.02 * expected.item()
    torch.testing.assert_close(CausalLMLoss(fast)(batch, batch), expected, rtol=1e-5, atol=1e-5)  # fp32: exact


def test_training_time_attention_dropout_is_applied():
    config = load_config(TINY_CONFIG)
    model = build_model(config).train()
    batch = torch.randint(5, 13317, (2, 32))
    torch.manual_seed(1)
    first = CausalLMLoss(model)(batch, batch)
    torch.manual_seed(2)
    assert CausalLMLoss(model)(batch, batch).item() != first.item()
    model.eval()
    assert CausalLMLoss(model)(batch, batch).item() == pytest.approx(CausalLMLoss(model)(batch, batch).item())
