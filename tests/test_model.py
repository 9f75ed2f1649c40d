import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_CONFIG

from gpt2zh.model import (
    CausalLMLoss,
    LinearCrossEntropy,
    blocked_causal_attention,
    build_model,
    count_parameters,
    dropout_mask,
    load_config,
)


def test_seed_config_has_the_seed_parameter_count():
    config = load_config(ROOT / "config" / "model_config_small.json")
    assert (config.n_ctx, config.n_embd, config.n_head, config.n_layer, config.vocab_size) == (1024, 768, 12, 10, 13317)
    with torch.device("meta"):
        model = build_model(config)
    assert count_parameters(model) == 81894144


def test_sampling_reads_a_full_config_as_gpt2config_does_and_leaves_a_partial_one_to_it(tmp_path):
    """sampling_config (generate.py's start without transformers) gives every setting sampling reads as load_config
    does for a config that names them all (train.py writes all of them); one that leaves some to GPT2Config's defaults
    (the original's, some released models') is read by GPT2Config; both refuse an n_ctx past n_positions."""
    import json

    from transformers import GPT2Config

    from gpt2zh.errors import UserError
    from gpt2zh.model import SAMPLING_SETTINGS, sampling_config

    full = tmp_path / "full.json"
    GPT2Config(**{**json.loads(TINY_CONFIG.read_text()), "bos_token_id": 4, "eos_token_id": 2}).to_json_file(full)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"n_embd": 32, "n_head": 2, "n_layer": 2, "vocab_size": 60, "n_ctx": 48}))
    for path in (full, partial, TINY_CONFIG):
        expected, read = load_config(path), sampling_config(path)
        assert isinstance(read, GPT2Config) == (path != full), path
        for name in (*SAMPLING_SETTINGS, "n_ctx", "bos_token_id", "eos_token_id"):
            assert getattr(read, name) == getattr(expected, name), (path, name)
    too_long = tmp_path / "too_long.json"
    too_long.write_text(json.dumps({**json.loads(full.read_text()), "n_ctx": 2048}))
    for read in (load_config, sampling_config):
        with pytest.raises(UserError, match="n_ctx 2048 exceeds n_positions"):
            read(too_long)


def test_dropout_mask_keeps_the_right_share():
    keep, keep_prob = dropout_mask((2000, 1000), 0.1)
    assert abs(keep_prob - 0.9) < 1e-4
    assert abs(keep.float().mean().item() - keep_prob) < 2e-3


def reference_attention(q, k, v, keep, keep_prob):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(scores, -1) * keep / keep_prob) @ v


def test_blocked_attention_is_causal_attention_with_dropout():
    q, k, v = (torch.randn(2, 3, 40, 8, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(0)
    out = blocked_causal_attention(q, k, v, 0.2, 8 ** -0.5, block=16)
    torch.manual_seed(0)  # redraw the same per-block masks into one full mask
    full = torch.zeros(2, 3, 40, 40, dtype=torch.bool)
    for start in range(0, 40, 16):
        end = min(start + 16, 40)
        full[:, :, start:end, :end], keep_prob = dropout_mask((2, 3, end - start, end), 0.2)
    torch.testing.assert_close(out, reference_attention(q, k, v, full, keep_prob))
    no_dropout = blocked_causal_attention(q, k, v, 0.0, 8 ** -0.5, block=16)
    torch.testing.assert_close(no_dropout, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_every_attention_dropout_kernel_agrees_with_the_reference_in_bf16(tmp_path, monkeypatch):
    """Each query block the trial may choose: bf16 output and gradients within 2% of fp64 with the same mask."""
    from gpt2zh.model import choose_dropout_attention, dropout_attention_candidates

    batch, heads, length, head_dim = 2, 3, 300, 16
    inputs = [torch.randn(batch, heads, length, head_dim, dtype=torch.float64) for _ in range(3)]
    grad = torch.randn(batch, heads, length, head_dim, dtype=torch.float64)
    candidates = dropout_attention_candidates(length)
    assert candidates == {"blocked-64": 64, "blocked-128": 128, "blocked-256": 256}
    for name, block in candidates.items():
        exact = [t.clone().requires_grad_() for t in inputs]
        fast = [t.to(torch.bfloat16).requires_grad_() for t in inputs]
        torch.manual_seed(0)
        out = blocked_causal_attention(*fast, 0.1, head_dim ** -0.5, block)
        out.backward(grad.to(torch.bfloat16))
        torch.manual_seed(0)  # the same masks, drawn block by block, into one [T, T] mask
        keep = torch.zeros(batch * heads, length, length, dtype=torch.bool)
        for start in range(0, length, block):
            end = min(start + block, length)
            keep[:, start:end, :end], keep_prob = dropout_mask((batch * heads, end - start, end), 0.1)
        expected = reference_attention(*exact, keep.view(batch, heads, length, length), keep_prob)
        expected.backward(grad)
        for got, want in [(out, expected)] + [(f.grad, e.grad) for f, e in zip(fast, exact, strict=True)]:
            error = (got.double() - want.detach()).norm() / want.detach().norm()
            assert error < 0.02, (name, error.item())

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = load_config(TINY_CONFIG)
    config.n_ctx = config.n_positions = 128
    model, said = build_model(config), []
    assert choose_dropout_attention(model, 2, torch.bfloat16, say=said.append) in ("blocked-64", "blocked-128")
    assert "measured now: blocked-" in said[0] and "blocked-64" in said[0] and "blocked-128" in said[0]
    assert (tmp_path / "gpt2zh" / "kernel_choices.json").is_file()
    choose_dropout_attention(model, 2, torch.bfloat16, say=said.append)
    assert "remembered in" in said[1]
    choose_dropout_attention(model, 2, torch.bfloat16, "blocked-64", say=said.append)
    assert {m.query_block for m in model.modules() if hasattr(m, "query_block")} == {64} and "as asked" in said[2]


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
    for got, want in zip(grads, expected_grads, strict=True):
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
