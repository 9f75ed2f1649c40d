import pytest
import torch

from conftest import ROOT, TINY_CONFIG
from gpt2zh.articles import ids_to_text
from gpt2zh.model import build_model, load_config
from gpt2zh.sampling import (PackedLinear, draw, make_logits_processors, pack_for_cpu_sampling,
                             sample)
from gpt2zh.vocab import load_tokenizer


def tiny_model():
    torch.manual_seed(0)
    model = build_model(load_config(TINY_CONFIG)).eval()
    with torch.no_grad():  # make it peaky enough that greedy decoding is not a string of ties
        model.transformer.wte.weight.mul_(20)
    return model


def test_cache_gives_the_same_greedy_tokens_as_recomputing():
    model = tiny_model()
    processors = make_logits_processors(1.0, 0, 0, 1.0, [])
    with_cache = sample(model, [4, 100, 200], 25, 2, processors, n_ctx=32, greedy=True)
    without = sample(model, [4, 100, 200], 25, 2, processors, n_ctx=32, greedy=True, use_cache=False)
    assert with_cache.tolist() == without.tolist()


def test_samples_differ_and_slide_past_n_ctx():
    model = tiny_model()
    processors = make_logits_processors(1.0, 0, 0, 1.0, [1])
    generator = torch.Generator().manual_seed(0)
    out = sample(model, [4, 100], 80, 3, processors, n_ctx=32, generator=generator)  # 82 tokens > n_ctx 32
    assert out.shape == (3, 82)
    assert len({tuple(row) for row in out.tolist()}) == 3


def test_unk_is_never_sampled_and_penalty_is_sign_aware():
    processors = make_logits_processors(1.0, 0, 0, 2.0, [1])
    scores = torch.tensor([[1.0, 100.0, -2.0, 4.0]])
    out = processors(torch.tensor([[2, 3]]), scores.clone())
    assert out[0, 1] == float("-inf")
    assert out[0, 2].item() == -4.0 and out[0, 3].item() == 2.0  # negative x2, positive /2


def test_output_text_format():
    tokenizer = load_tokenizer(ROOT / "cache" / "vocab_small.txt")
    tokens = ["[MASK]", "第", "一", "[SEP]", "he", "##llo", "world", "！", "[CLS]", "[MASK]", "下"]
    text = ids_to_text(tokenizer, tokenizer.convert_tokens_to_ids([t if t not in ("he", "world") else "h" for t in tokens]))
    assert text.startswith("第一\nh")
    ids = tokenizer.convert_tokens_to_ids(["你", "[SEP]", "a", "##b", "c", "[CLS]", "[MASK]", "好"])
    assert ids_to_text(tokenizer, ids) == "你\nab c\n\n好"


def test_cpu_sampling_path_keeps_the_tokens():
    """bf16 weights packed for oneDNN and an fp32 cache (generate.py on CPU) against re-encoding in bf16."""
    model = tiny_model().to(torch.bfloat16)
    processors = make_logits_processors(1.0, 0, 0, 1.0, [])
    ids = torch.tensor([[4, 100, 200, 300]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    without = sample(model, [4, 100, 200], 25, 2, processors, n_ctx=32, greedy=True, use_cache=False)
    pack_for_cpu_sampling(model, rows=2)
    if torch.backends.mkldnn.is_available():
        assert isinstance(model.lm_head, PackedLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0.02, atol=0.02)
    with_cache = sample(model, [4, 100, 200], 25, 2, processors, n_ctx=32, greedy=True)
    assert model.config._attn_implementation == "gpt2zh_blocked"  # the attention that takes the fp32 cache
    assert with_cache.tolist() == without.tolist()


def test_draw_follows_the_probabilities_and_never_picks_a_zero():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    ids = draw(probs, torch.Generator().manual_seed(0)).view(20000, 2)
    share = torch.bincount(ids[:, 0], minlength=4) / 20000
    assert share[1] == 0 and (ids[:, 1] == 3).all()
    torch.testing.assert_close(share, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.015, rtol=0)  # ~4.5 sigma


def test_every_sampling_kernel_gives_the_logits_of_a_full_forward_pass(tmp_path, monkeypatch):
    """Each candidate the trial can choose (cache dtype x attention x packed linears) continues a sequence with the
    logits of re-encoding it in fp32: within 1e-4 with fp32 weights, 3% of the logits' range with bf16 ones."""
    import copy

    from gpt2zh.sampling import apply_kernel, choose_kernel, kernel_candidates, preallocated_cache

    reference_model = tiny_model()
    sequence = torch.tensor([[4, 100, 200, 300, 400, 500, 600, 700]])
    with torch.no_grad():
        reference = reference_model(input_ids=sequence).logits[0, 3:]  # positions 3..7 predict 4..8
    tried = []
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 0.03)):
        for name, kernel in kernel_candidates(copy.deepcopy(reference_model).to(dtype)).items():
            model = copy.deepcopy(reference_model).to(dtype)
            apply_kernel(model, kernel, rows=1)
            cache = preallocated_cache(model, 32)
            with torch.no_grad():
                logits = [model(input_ids=sequence[:, :4], cache=cache, use_cache=True).logits[0, -1]]
                for position in range(4, 8):
                    logits.append(model(input_ids=sequence[:, position:position + 1], cache=cache,
                                        use_cache=True).logits[0, -1])
            error = (torch.stack(logits).float() - reference).abs().max() / reference.abs().max()
            assert error < tolerance, (name, dtype, error.item())
            tried.append(name)
    assert {"fp32-matmul", "fp32-sdpa", "bf16-matmul", "bf16-sdpa"} <= set(tried)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    said = []
    model = copy.deepcopy(reference_model).to(torch.bfloat16)
    chosen = choose_kernel(model, 2, 16, say=said.append)
    assert chosen in tried and "measured now" in said[0] and (tmp_path / "gpt2zh" / "kernel_choices.json").is_file()
    assert choose_kernel(copy.deepcopy(reference_model).to(torch.bfloat16), 2, 16, say=said.append) == chosen
    assert "remembered in" in said[1]
    assert choose_kernel(model, 2, 16, "fp32-sdpa", say=said.append) == "fp32-sdpa"
    from gpt2zh.errors import UserError

    with pytest.raises(UserError, match="--sampling_kernel fast: not one of: auto, fp32-matmul"):
        choose_kernel(model, 2, 16, "fast", say=said.append)
