import os
import platform
import time

import pytest
import torch
from conftest import ROOT, TINY_CONFIG
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2zh.articles import ids_to_text
from gpt2zh.devices import bf16_supported
from gpt2zh.inference import encode_tokens
from gpt2zh.model import build_model, load_config
from gpt2zh.sampling import draw, make_logits_processors, sample
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


def test_encoding_a_block_of_tokens_gives_the_logits_of_the_models_own_forward():
    """encode_tokens (the prefix, and a window re-encoded after a slide) against transformers' forward: a whole
    sequence at once, and in two blocks where the second attends to the cache the first filled."""
    from gpt2zh.decoding import preallocated_cache
    from gpt2zh.inference import encode_tokens

    model = tiny_model()
    with torch.no_grad():
        for parameter in model.parameters():  # no layer negligible
            parameter.add_(torch.randn_like(parameter) * 0.1)
        ids = torch.tensor([[4, 100, 200, 300, 17, 42, 99], [4, 7, 8, 9, 10, 11, 12]])  # [B, T]
        reference = model(input_ids=ids).logits  # [B, T, vocab]
        whole = encode_tokens(model, ids, preallocated_cache(model, 16))
        cache = preallocated_cache(model, 16)
        first, second = encode_tokens(model, ids[:, :3], cache), encode_tokens(model, ids[:, 3:], cache)
    torch.testing.assert_close(whole, reference[:, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first, reference[:, 2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second, reference[:, -1], atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 7


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


def test_the_logits_processors_compute_what_transformers_processors_do():
    """Ours (taking transformers off generate.py's start) against transformers', exactly: the repetition penalty on
    negative and positive scores of repeated ids, top-k where the k-th score is shared and k passes the vocabulary,
    top-p where one token alone reaches p and where p rounds to nothing (the most likely kept), the temperature, and
    all of them chained in make_logits_processors' order."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from gpt2zh.sampling import RepetitionPenalty, TopK, TopP

    torch.manual_seed(0)
    scores = torch.randn(6, 50) * 3
    scores[0, :5] = scores[0, 0]  # five tied scores
    scores[1, 7] = 30.0  # one token with nearly all the probability
    input_ids = torch.randint(0, 50, (6, 30))  # repeats
    pairs = [(RepetitionPenalty(1.3), RepetitionPenaltyLogitsProcessor(1.3)),
             (RepetitionPenalty(0.8), RepetitionPenaltyLogitsProcessor(0.8)),
             *((TopK(k), TopKLogitsWarper(k)) for k in (1, 3, 8, 60)),
             *((TopP(p), TopPLogitsWarper(p)) for p in (1e-9, 0.01, 0.5, 0.95))]
    for ours, theirs in pairs:
        assert torch.equal(ours(input_ids, scores.clone()), theirs(input_ids, scores.clone())), ours
    # --repetition_window: transformers' penalty over the last 7 tokens, where the whole row's differs
    windowed = RepetitionPenalty(1.3, window=7)(input_ids, scores.clone())
    assert torch.equal(windowed, RepetitionPenaltyLogitsProcessor(1.3)(input_ids[:, -7:], scores.clone()))
    assert not torch.equal(windowed, RepetitionPenalty(1.3)(input_ids, scores.clone()))
    chained = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7),
                                   TopKLogitsWarper(8), TopPLogitsWarper(0.9)])
    ours = make_logits_processors(0.7, 8, 0.9, 1.2, [])
    assert torch.equal(ours(input_ids, scores.clone()), chained(input_ids, scores.clone()))


def test_a_chain_ending_in_top_k_draws_the_token_the_masked_whole_row_draws():
    """Processors.draw draws from the k kept tokens alone where the chain ends in TopK: for the same uniform number,
    the token the whole row's softmax and inverse CDF would give with the others masked (200 seeds, ten rows of a
    13k vocabulary, banned ids, k of 1, 8 and 40); a chain that ends otherwise draws from the whole row."""
    from gpt2zh.sampling import Processors, SuppressIds

    torch.manual_seed(0)
    for seed in range(200):
        k = (1, 8, 40)[seed % 3]
        chain = make_logits_processors(0.8, k, 0, 1.3, [0, 100])
        input_ids, scores = torch.randint(0, 13317, (10, 30)), torch.randn(10, 13317) * 3
        masked = draw(torch.softmax(chain(input_ids, scores), dim=-1), torch.Generator().manual_seed(seed))
        assert torch.equal(chain.draw(input_ids, scores, torch.Generator().manual_seed(seed)), masked), seed
    banned = Processors([SuppressIds([1, 2])])
    scores = torch.tensor([[0.0, 5.0, 5.0, 1.0]]).repeat(2000, 1)
    ids = banned.draw(torch.zeros(2000, 1, dtype=torch.long), scores, torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {0, 3}


def test_output_text_format():
    tokenizer = load_tokenizer(ROOT / "cache" / "vocab_small.txt")
    tokens = ["[MASK]", "第", "一", "[SEP]", "he", "##llo", "world", "！", "[CLS]", "[MASK]", "下"]
    ids = tokenizer.convert_tokens_to_ids([t if t not in ("he", "world") else "h" for t in tokens])
    text = ids_to_text(tokenizer, ids)
    assert text.startswith("第一\nh")
    ids = tokenizer.convert_tokens_to_ids(["你", "[SEP]", "a", "##b", "c", "[CLS]", "[MASK]", "好"])
    assert ids_to_text(tokenizer, ids) == "你\nab c\n\n好"


def test_draw_follows_the_probabilities_and_never_picks_a_zero():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    ids = draw(probs, torch.Generator().manual_seed(0)).view(20000, 2)
    share = torch.bincount(ids[:, 0], minlength=4) / 20000
    assert share[1] == 0 and (ids[:, 1] == 3).all()
    torch.testing.assert_close(share, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.015, rtol=0)  # ~4.5 sigma


def test_every_sampling_kernel_gives_the_logits_of_a_full_forward_pass(tmp_path, monkeypatch):
    """Each candidate the trial can choose (cache dtype x attention x linear layers), run as sample() runs it
    (encode_tokens over the prefix into the kernel's cache, then DecodeStep a token at a time), continues a sequence
    with the logits of re-encoding it in fp32: within 1e-4 with fp32 weights (3e-3 through fp16 copies), 3% of the
    logits' range with bf16 ones, 0.3% with fp16 ones. The model itself is left as it was."""
    import copy

    from gpt2zh.decoding import choose_kernel, decode_step, default_kernel, kernel_candidates, preallocated_cache

    reference_model = tiny_model()
    with torch.no_grad():  # biases and layer norms away from their first 0 and 1: a kernel that drops one fails
        for parameter in reference_model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    sequence = torch.tensor([[4, 100, 200, 300, 400, 500, 600, 700]] * 2)
    with torch.no_grad():
        reference = reference_model(input_ids=sequence[:1]).logits[0, 3:]  # positions 3..7 predict 4..8
    tried = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # fp16: the weights on fp16-only GPUs
        model = copy.deepcopy(reference_model).to(dtype)
        weights = copy.deepcopy(model.state_dict())
        candidates = {**kernel_candidates(model), "default": default_kernel(model)}  # the default: what GPUs run
        for name, kernel in candidates.items():
            step = decode_step(model, kernel, rows=2)
            cache = preallocated_cache(model, 32, kernel.cache_dtype)
            logits = [encode_tokens(model, sequence[:, :4], cache)]
            for position in range(4, 8):
                logits.append(step(sequence[:, position], cache))
            logits = torch.stack(logits, dim=1).float()  # [2, 5, vocab]
            assert cache.get_seq_length() == 8
            narrowed = kernel.linear == "fp16" or kernel.attention == "cpp"  # fp32 weights copied in fp16, bf16, int8
            tolerance = {torch.bfloat16: 0.03, torch.float16: 3e-3}.get(dtype, 0.03 if narrowed else 1e-4)
            error = (logits - reference).abs().max() / reference.abs().max()
            assert error < tolerance, (name, dtype, error.item())
            tried.append((name, dtype))
        assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())
    expected = {("fp32-sdpa", torch.float32), ("fp32-sdpa+fp16", torch.float32), ("bf16-cpp", torch.float32),
                ("int8-cpp", torch.float32), ("fp32-sdpa+fp16", torch.bfloat16), ("bf16-cpp", torch.bfloat16),
                ("int8-cpp", torch.bfloat16), ("default", torch.float16)}
    if bf16_supported(torch.device("cpu")):  # oneDNN packs bf16 weights on CPUs with AVX-512 or AVX-NE-CONVERT
        expected |= {("fp32-sdpa+packed", torch.bfloat16), ("bf16-sdpa+packed", torch.bfloat16)}
    assert expected <= set(tried)
    tried = {name for name, _ in tried}

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    said = []
    model = copy.deepcopy(reference_model).to(torch.bfloat16)
    chosen = choose_kernel(model, 2, 16, say=said.append).name
    assert chosen in tried and "measured now" in said[0] and (tmp_path / "gpt2zh" / "kernel_choices.json").is_file()
    assert f"measured now: {chosen} " in said[0]  # fastest first
    assert choose_kernel(copy.deepcopy(reference_model).to(torch.bfloat16), 2, 16, say=said.append).name == chosen
    assert "remembered in" in said[1]
    from gpt2zh import native_build

    monkeypatch.setattr(native_build, "source_version", lambda: "a-newer-one")  # an update of the C++ step
    choose_kernel(model, 2, 16, say=said.append)
    assert "measured now" in said[2]
    assert choose_kernel(model, 2, 16, "fp32-sdpa+fp16", say=said.append).name == "fp32-sdpa+fp16"
    from gpt2zh.errors import UserError

    with pytest.raises(UserError, match="--sampling_kernel fast: not one of: auto, bf16-cpp, int8-cpp, fp32-sdpa"):
        choose_kernel(model, 2, 16, "fast", say=said.append)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
def test_every_x86_code_path_of_the_cpp_step_compiles(tmp_path):
    """decode_step.cpp's branches for instruction sets this CPU may lack compile too (a CPU that has them runs them in
    the tests below): AVX-512 with bf16 dot products (a Zen 4), AVX-512 without them but with VNNI's byte dot
    products (an Ice Lake), AVX-512 without either (a Skylake server), AVX2 with VNNI's (an Alder Lake) and without
    (a Zen 3), and none of these (the portable vector code)."""
    from concurrent.futures import ThreadPoolExecutor

    from gpt2zh import native_build

    command = native_build.compiler()
    targets = (("sapphirerapids", {"avx512_bf16"}, set()),
               ("icelake-server", {"avx512_vnni"}, {"avx512_bf16"}),
               ("skylake-avx512", {"avx512bw"}, {"avx512_bf16", "avx512_vnni"}),
               ("alderlake", {"avx_vnni"}, {"avx512f"}), ("haswell", {"avx2", "fma"}, {"avx_vnni"}),
               ("x86-64-v2", {"sse4_2"}, {"avx2"}))
    for march, marks, lacks in targets:
        features = native_build.target_features(command, march)
        if not features:
            pytest.skip(f"{command} cannot say what it compiles for")
        assert marks <= features and not lacks & features, (march, features)
    # -O0: an intrinsic its branch's instruction sets lack is an error at any level (GCC: "target specific option
    # mismatch"), in a fifth of -O3's time
    with ThreadPoolExecutor(os.cpu_count()) as builds:  # one compiler a core
        list(builds.map(lambda march: native_build.build(command, tmp_path / f"{march}.so", march, "-O0"),
                        [march for march, _, _ in targets]))
    for march, _, _ in targets:
        assert (tmp_path / f"{march}.so").stat().st_size > 0


# the C++ step built for this CPU, and on x86 also for one without AVX2 (its portable vector code, which AVX-512 and
# ARM CPUs run)
MARCHES = ["native", *(["x86-64-v2"] if platform.machine() in ("x86_64", "AMD64") else [])]


@pytest.mark.parametrize("march", MARCHES)
def test_the_cpp_step_agrees_on_every_head_size_odd_widths_more_rows_than_a_block_and_both_activations(
        march, tmp_path, monkeypatch, request):
    """The C++ step, with bf16 weights and cache and with int8 ones, attends in vectors for heads of 32, 64 and 128
    and in scalars otherwise (here 7); it pads odd widths (n_embd 21, n_inner 45, vocab 50: not whole tiles of 16 or
    quads of inputs) and takes rows in blocks: 17 rows cross a block. With attention scaled by the inverse layer index,
    caches of 135 to 140 tokens (blocks of 64 keys whose running maximum grows, and every remainder of its loops over
    8, 4 and 2 keys) and both activations it computes, against the model's fp32 forward: bf16-cpp within 3% of the
    logits' range, int8-cpp within 8% (rounding the weights and inputs of these random models moves their logits by
    2-5%). And int8-cpp computes what PyTorch computes with the same rounding (to 1e-4): a sublayer at a time, the
    other's output zeroed (through both, a difference in the last bit of an input may move it a level, and the
    logits by a few percent)."""
    import copy

    from gpt2zh import native_build
    from gpt2zh.decoding import decode_step, kernel_candidates, preallocated_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("GPT2ZH_MARCH", march)
    native_build.building.cache_clear()
    request.addfinalizer(native_build.building.cache_clear)  # later tests load the build for this CPU again
    shapes = [(21, 3, 45, "gelu_new"), (21, 3, 45, "relu"), (64, 2, None, "gelu_new"), (128, 2, None, "gelu_new"),
              (128, 1, None, "relu")]  # n_embd, n_head, n_inner, activation: heads of 7, 32, 64, 128
    for (n_embd, n_head, n_inner, activation), silenced in [*((shape, None) for shape in shapes),
                                                            (shapes[0], "attn"), (shapes[0], "mlp")]:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=50, n_positions=160, n_embd=n_embd, n_head=n_head, n_inner=n_inner, n_layer=2,
                            activation_function=activation, scale_attn_by_inverse_layer_idx=True)
        reference_model = GPT2LMHeadModel(config).eval()
        with torch.no_grad():
            for parameter in reference_model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)
            for block in reference_model.transformer.h if silenced else ():
                getattr(block, silenced).c_proj.weight.zero_()
                getattr(block, silenced).c_proj.bias.zero_()
        sequence = torch.randint(0, 50, (17, 140))
        model = copy.deepcopy(reference_model).to(torch.bfloat16)
        if silenced:  # PyTorch with int8-cpp's rounding, over the same int8 cache, its queries and outputs in fp32
            cache = preallocated_cache(model, 144, torch.int8)
            encode_tokens(model, sequence[:, :134], cache)
            quantized = quantized_as_the_int8_step(model)
            reference = torch.stack([encode_tokens(quantized, sequence[:, position:position + 1], cache)
                                     for position in range(134, 140)], dim=1)
            kernels = {"int8-cpp": 1e-4}
        else:
            with torch.no_grad():
                reference = reference_model(input_ids=sequence).logits[:, 134:]
            kernels = {"bf16-cpp": 0.03, "int8-cpp": 0.08}
        for name, tolerance in kernels.items():
            kernel = kernel_candidates(model)[name]
            step, cache = decode_step(model, kernel), preallocated_cache(model, 144, kernel.cache_dtype)
            encode_tokens(model, sequence[:, :134], cache)
            logits = torch.stack([step(sequence[:, position], cache) for position in range(134, 140)], dim=1)
            error = (logits.float() - reference).abs().max() / reference.abs().max()
            assert error < tolerance, (name, silenced, n_embd, n_head, activation, error.item())
            assert cache.get_seq_length() == 140


def test_int8_weights_are_packed_as_rounding_them_in_pytorch_and_laying_them_out_would():
    """gpt2_pack_int8 against PyTorch, byte for byte: each output's inputs rounded by native.quantized, zero levels
    padded to whole quads of inputs and tiles of 16 outputs, laid out [tiles, quads, 16, 4] as level + 128; over a
    contiguous [in, out] weight (a Conv1D's), a transposed view of an [out, in] one (the tied output layer), bf16
    weights (whose products with a scale often land halfway between two levels: rounded to even), and an output of
    zeros (scale 0)."""
    from gpt2zh.native import pack_int8, quantized

    torch.manual_seed(0)
    out_in = torch.randn(45, 37)
    out_in[7] = 0.0
    for weight in (out_in.t().contiguous(), out_in.t(), torch.randn(300, 200).to(torch.bfloat16), torch.randn(64, 32)):
        inputs, outputs = weight.shape
        levels, scale = quantized(weight.t(), 127)  # [out, in], [out, 1]
        expected = torch.zeros(-(-inputs // 4) * 4, -(-outputs // 16) * 16, dtype=torch.int16)
        expected[:inputs, :outputs] = levels.t().to(torch.int16)
        expected = (expected + 128).to(torch.uint8).view(-1, 4, expected.shape[1] // 16, 16).permute(2, 0, 3, 1)
        packed, scales = pack_int8(weight)
        assert torch.equal(packed, expected), (weight.shape, weight.stride(), weight.dtype)
        assert torch.equal(scales, scale[:, 0])


def test_bf16_weights_are_packed_as_laying_them_out_in_pytorch_would():
    """gpt2_pack_bf16 against PyTorch, bit for bit: the weight rounded by .to(torch.bfloat16), zero-padded to whole
    input pairs and tiles of 16 outputs, laid out [tiles, pairs, 16, 2]; from fp32 (contiguous [in, out], a transposed
    view, odd sizes, values halfway between two bf16 numbers: rounded to even; infinities) and from bf16 weights."""
    from gpt2zh.native import pack

    torch.manual_seed(0)
    out_in = torch.randn(45, 37)
    out_in[3, :4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, float("inf"), -float("inf")])  # two ties, infinities
    for weight in (out_in.t().contiguous(), out_in.t(), torch.randn(300, 200).to(torch.bfloat16), torch.randn(64, 32)):
        inputs, outputs = weight.shape
        expected = torch.zeros(-(-inputs // 2) * 2, -(-outputs // 16) * 16, dtype=torch.bfloat16)
        expected[:inputs, :outputs] = weight
        expected = expected.view(-1, 2, expected.shape[1] // 16, 16).permute(2, 0, 3, 1)  # [tiles, pairs, 16, 2]
        packed = pack(weight)
        assert torch.equal(packed.view(torch.int16), expected.view(torch.int16)), (weight.shape, weight.stride())


def quantized_as_the_int8_step(model):
    """An fp32 copy of `model` whose linear layers compute as int8-cpp's do: the weights rounded to int8 with a scale
    per output (as native.pack_int8), each input row to -63..63 with its own scale (decode_step.cpp's quantize_rows);
    and whose attention rounds each head's query to -127..127 as it rounds keys (decode_step.cpp's rounded_query)."""
    import copy

    from gpt2zh.model import weight_out_in
    from gpt2zh.native import quantized

    def rounded(x, top_level):
        levels, scale = quantized(x, top_level)
        return levels * scale

    copied = copy.deepcopy(model).float()
    layers = [layer for block in copied.transformer.h for layer in (block.attn.c_attn, block.attn.c_proj,
                                                                    block.mlp.c_fc, block.mlp.c_proj)]
    for layer in [*layers, copied.lm_head]:
        weight = rounded(weight_out_in(layer).detach(), 127).t()  # [in, out], each output with its own scale
        bias = layer.bias.detach() if layer.bias is not None else 0.0
        layer.forward = lambda x, weight=weight, bias=bias: rounded(x, 63) @ weight + bias
    heads, width = copied.config.n_head, copied.config.n_embd
    for block in copied.transformer.h:
        def rounded_queries(x, project=block.attn.c_attn.forward):
            query, keys_values = project(x).split([width, 2 * width], dim=-1)
            query = rounded(query.unflatten(-1, (heads, -1)), 127).flatten(-2)  # [B, T, heads, head_dim]
            return torch.cat([query, keys_values], dim=-1)
        block.attn.c_attn.forward = rounded_queries
    return copied


def test_without_a_working_compiler_the_cpp_step_is_left_out_and_asking_for_it_is_explained(tmp_path):
    """A machine where nothing can be compiled (here: CXX names no compiler, and an empty kernel cache): the trial
    says in one line that it leaves the C++ step out and goes on with the others; forcing it says why."""
    import os
    import subprocess
    import sys

    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from gpt2zh.errors import UserError
from gpt2zh.model import build_model, load_config
from gpt2zh.decoding import decode_step, kernel_candidates, measure_kernels
model = build_model(load_config({str(TINY_CONFIG)!r})).eval()
timings = measure_kernels(model, 2, 8, 32)
candidates = kernel_candidates(model)
in_cpp = {{"bf16-cpp", "int8-cpp"}}
assert in_cpp <= set(candidates) and not in_cpp & set(timings), timings
assert "fp32-sdpa" in timings and "fp32-sdpa+fp16" in timings, timings
try:
    decode_step(model, candidates["bf16-cpp"], 2)
except UserError as error:
    print(error)
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    left_out, forced = result.stdout.splitlines()
    assert left_out.startswith("sampling kernels bf16-cpp, int8-cpp left out: no C++ compiler: ")
    assert forced.startswith("sampling kernel bf16-cpp: no C++ compiler: ")
    assert forced.endswith("--sampling_kernel chooses another")


def test_a_writer_chooses_a_kernel_for_each_number_of_rows_it_writes(trained, tmp_path, monkeypatch):
    """One row (a page streaming one continuation) and several rows get each their own trial, once."""
    from gpt2zh.sampling import Writer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    said = []
    writer = Writer(trained / "model" / "final_model", say=said.append)
    assert list(writer.steps) == [1] and len(said) == 1 and "measured now" in said[0]
    processors = writer.processors(1.0, 8, 0, 1.0)
    rows = writer.write([4, 100], 12, 3, processors, seed=0)
    assert len(rows) == 3 and all(len(row) == 14 for row in rows)
    assert sorted(writer.steps) == [1, 3] and len(said) == 2
    writer.write([4, 100], 12, 3, processors, seed=1)
    assert len(said) == 2  # the 3-row step is kept
    forced = Writer(trained / "model" / "final_model", kernel="fp32-sdpa+fp16", say=said.append)
    forced.write([4, 100], 5, 2, processors, seed=0)
    assert {step.kernel.name for step in forced.steps.values()} == {"fp32-sdpa+fp16"}
    native = Writer(trained / "model" / "final_model", kernel="bf16-cpp", say=said.append)
    native.write([4, 100], 5, 2, processors, seed=0)
    assert native.steps[1] is native.steps[2]  # one copy of the packed weights for every number of rows


def test_a_writer_samples_with_the_step_its_trial_prepared(trained, tmp_path, monkeypatch):
    """A first run's trial has already packed the chosen kernel's weights: the Writer steps with the trial's step
    instead of packing them again, and writes what a Writer that remembered the choice writes."""
    from gpt2zh import sampling

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built, build = [], sampling.decode_step
    monkeypatch.setattr(sampling, "decode_step", lambda *args: built.append(args[1].name) or build(*args))
    first = sampling.Writer(trained / "model" / "final_model", say=lambda line: None)
    assert built == []
    again = sampling.Writer(trained / "model" / "final_model", say=lambda line: None)
    assert built == [first.steps[1].kernel.name] == [again.steps[1].kernel.name]
    processors = first.processors(1.0, 8, 0, 1.0)
    assert first.write([4, 100], 12, 1, processors, seed=3) == again.write([4, 100], 12, 1, processors, seed=3)


def test_a_writer_of_our_folders_never_imports_transformers(trained, tmp_path):
    """Importing transformers took 1.2 of the 3 s before generate.py's first character (GPT2LMHeadModel 1.8 more,
    before gpt2zh.inference): a Writer of one of our folders reads its config and tokenizer, samples with every logits
    processor and the weights in gpt2zh.inference's modules without it, and gives the same tokens as transformers'
    model."""
    import subprocess
    import sys

    script = f"""
import sys, torch
from gpt2zh.sampling import Writer
writer = Writer({str(trained / "model" / "final_model")!r}, precision="fp32", kernel="fp32-sdpa", say=lambda line: None)
print(writer.write([4, 100, 200], 20, 1, writer.processors(0.9, 8, 0.95, 1.2), seed=0, greedy=True)[0])
print([name for name in sys.modules if name.split(".")[0] == "transformers"])
"""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    tokens, modules = result.stdout.splitlines()
    assert modules == "[]"
    from gpt2zh.checkpoints import load_model_folder

    model = load_model_folder(trained / "model" / "final_model")[0].eval()
    expected = sample(model, [4, 100, 200], 20, 1, make_logits_processors(0.9, 8, 0.95, 1.2, []), n_ctx=32,
                      greedy=True)
    assert tokens == str(expected[0].tolist())


def test_a_compiler_that_fails_is_named_with_its_first_error(tmp_path, monkeypatch):
    """A compiler that cannot build the C++ step (an old one, a missing OpenMP): the message names it and its first
    error line, not a note printed before it; nothing half-built is left to load next time."""
    from gpt2zh import native_build
    from gpt2zh.errors import UserError

    compiler = tmp_path / "old-c++"
    compiler.write_text("#!/bin/sh\necho 'cc1plus: note: something first' >&2\n"
                        "echo 'decode_step.cpp:1: error: unrecognized -fopenmp' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native_build.building.cache_clear()
    try:
        with pytest.raises(UserError, match=r"could not build decode_step.cpp: decode_step.cpp:1: error: unrecognized"):
            native_build.library()
    finally:
        native_build.building.cache_clear()
    assert not list((tmp_path / "cache").rglob("*.so")) and not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_compiler_without_openmp_builds_both_halves_without_it(tmp_path, monkeypatch):
    """macOS's clang has no -fopenmp: the two halves of the C++ step are built again without it (one thread), linked
    and loaded, and pack weights as the OpenMP build does; the build's note says so, and no object file is left."""
    import json

    from gpt2zh import native, native_build

    compiler = tmp_path / "clang-without-openmp"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && '
                        '{ echo "clang: error: unsupported option \'-fopenmp\'" >&2; exit 1; }; done\n'
                        f'exec {native_build.compiler()} "$@"\n')
    compiler.chmod(0o755)
    weight = torch.randn(37, 45)
    expected = native.pack(weight), native.pack_int8(weight)  # this machine's OpenMP build
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native_build.building.cache_clear()
    try:
        packed, (levels, scales) = native.pack(weight), native.pack_int8(weight)
    finally:
        native_build.building.cache_clear()
    assert torch.equal(packed.view(torch.int16), expected[0].view(torch.int16))
    assert torch.equal(levels, expected[1][0]) and torch.equal(scales, expected[1][1])
    (note,) = (tmp_path / "cache").rglob("decode_step-*.json")
    assert json.loads(note.read_text())["openmp"] is False
    assert sorted(path.suffix for path in (tmp_path / "cache" / "gpt2zh").iterdir()) == [".json", ".so"]  # no .o left


class SleepingStep:
    """A stand-in kernel's step taking `seconds`, counting its calls."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, 0

    def __call__(self, ids, cache):
        self.calls += 1
        time.sleep(self.seconds)


def test_a_kernel_far_behind_after_a_round_sits_the_later_rounds_out(monkeypatch):
    """The trial's rounds go on among the candidates that can still win: one 5x slower than the fastest runs a
    single round (its time still reported), the close ones all three."""
    from gpt2zh import decoding

    steps = {"fast": SleepingStep(0.002), "close": SleepingStep(0.002), "slow": SleepingStep(0.010)}
    kernels = {name: decoding.SamplingKernel("fp32", name, "plain") for name in steps}  # named by their attention
    monkeypatch.setattr(decoding, "kernel_candidates", lambda model: kernels)
    monkeypatch.setattr(decoding, "rewind", lambda cache, length: None)
    monkeypatch.setattr(decoding, "prepare_entrant", lambda model, kernel, rows, keys, linears, caches: (
        steps[kernel.attention], None, 0.0))
    model = torch.nn.Linear(2, 2)
    timings = decoding.measure_kernels(model, rows=1, keys=8, run_steps=100, rounds=3, steps=3)
    assert {name: step.calls for name, step in steps.items()} == {"fast": 9, "close": 9, "slow": 3}
    assert timings["slow"] > 3 * timings["fast"]


def test_the_kernels_measured_to_lose_are_timed_only_where_they_were_not(monkeypatch):
    """Where the C++ step is written in the CPU's vector instructions (AVX2, AVX-512) the trial leaves out the
    PyTorch kernels measured to lose to it there; in AVX2 also bf16-cpp (int8-cpp won every trial there), and with
    AVX512-BF16 dot products on a CPU without AMX bf16-sdpa+packed (oneDNN's packed bf16 layers use AMX where it is);
    where it is in portable vectors (ARM) it times every candidate."""
    from gpt2zh import decoding, native

    kernels = {kernel.name: kernel for kernel in decoding.CANDIDATES}
    monkeypatch.setattr(decoding, "kernel_candidates", lambda model: kernels)
    monkeypatch.setattr(decoding, "rewind", lambda cache, length: None)
    monkeypatch.setattr(decoding, "prepare_entrant", lambda model, kernel, rows, keys, linears, caches: (
        SleepingStep(0.0), None, 0.0))
    behind = decoding.BEHIND_THE_CPP_STEP
    avx512, zen4, xeon_with_amx = {"avx2", "avx512f"}, {"avx2", "avx512f", "avx512_bf16"}, {"avx512_bf16", "amx_bf16"}
    for arithmetic, features, expected in (("AVX-512", avx512, set(kernels) - behind),
                                           ("AVX2 with FMA", {"avx2"}, set(kernels) - behind - {"bf16-cpp"}),
                                           ("AVX512-BF16 pair dot products", zen4,
                                            set(kernels) - behind - {"bf16-sdpa+packed"}),
                                           ("AVX512-BF16 pair dot products", xeon_with_amx, set(kernels) - behind),
                                           ("the compiler's portable vectors", {"asimd"}, set(kernels))):
        monkeypatch.setattr(native, "arithmetic", lambda answer=arithmetic: answer)
        monkeypatch.setattr(decoding, "cpu_features", lambda answer=features: answer)
        timings = decoding.measure_kernels(torch.nn.Linear(2, 2), rows=1, keys=8, run_steps=100, rounds=1, steps=1)
        assert set(timings) == expected, arithmetic
    assert {"bf16-cpp", "int8-cpp", "bf16-sdpa+packed"} <= set(kernels) - behind


def test_a_trial_that_timed_one_candidate_does_not_call_it_the_fastest(tmp_path, monkeypatch):
    """Where the others were left out untimed (measured to lose on CPUs of this kind), the line names the one timed
    as such; "the fastest here" is said only of a comparison made here."""
    from gpt2zh import kernel_trials

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for timings, wording in (({"narrow": 0.004}, "the only one timed here"), ({"narrow": 0.004, "wide": 0.008},
                                                                            "the fastest here")):
        lines = []
        chosen = kernel_trials.choose("test kernel", "--test_kernel", "auto", {"wide": 0, "narrow": 0},
                                      f"shape {len(timings)}", lambda timings=timings: timings, "a step", lines.append)
        assert chosen == "narrow" and len(lines) == 1 and wording in lines[0], lines
        assert ("the fastest here" in lines[0]) == (len(timings) > 1)


def test_a_writer_starts_the_cpp_build_before_it_loads_the_model(trained, tmp_path, monkeypatch):
    """The compiler runs while the model loads (a first run on a machine); a forced PyTorch kernel builds nothing."""
    from gpt2zh import native_build, sampling

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    events, load = [], sampling.open_model_folder
    monkeypatch.setattr(native_build, "start_building", lambda: events.append("build"))
    monkeypatch.setattr(sampling, "open_model_folder",
                        lambda *args, **kwargs: events.append("load") or load(*args, **kwargs))
    for kernel in ("auto", "int8-cpp"):
        sampling.Writer(trained / "model" / "final_model", kernel=kernel, say=lambda line: None)
        assert events == ["build", "load"]
        events.clear()
    # fp32 weights, where fp32-sdpa is a candidate on any CPU (auto gives bf16 ones where bf16 is fast: a Zen 4)
    sampling.Writer(trained / "model" / "final_model", precision="fp32", kernel="fp32-sdpa", say=lambda line: None)
    assert events == ["load"]


def test_the_cpp_step_writes_the_same_logits_on_any_number_of_threads():
    """Each output of the C++ step is computed by one thread, so ThreadCount may switch between counts mid-run: the
    logits of three rows over three positions, bit for bit, on 1, 2 and 3 threads, bf16 and int8."""
    from gpt2zh.decoding import decode_step, kernel_candidates, preallocated_cache

    torch.manual_seed(0)
    model = build_model(load_config(TINY_CONFIG)).eval().to(torch.bfloat16)
    sequence = torch.randint(0, model.config.vocab_size, (3, 12))
    for name in ("bf16-cpp", "int8-cpp"):
        kernel = kernel_candidates(model)[name]
        results = []
        for threads in (1, 2, 3):
            step, cache = decode_step(model, kernel), preallocated_cache(model, 16, kernel.cache_dtype)
            step.threads.choose = lambda threads=threads: threads
            encode_tokens(model, sequence[:, :9], cache)
            results.append(torch.stack([step(sequence[:, position], cache) for position in range(9, 12)]))
        assert all(torch.equal(results[0], other) for other in results[1:]), name


def test_the_cpp_step_refuses_a_cache_of_other_rows_another_dtype_or_no_room_left():
    """It keeps its pointers to a cache's buffers from the first step on; a cache it cannot write into is refused at
    every step, not only the first: the C++ side writes unchecked."""
    from gpt2zh.decoding import decode_step, kernel_candidates, preallocated_cache

    torch.manual_seed(0)
    model = build_model(load_config(TINY_CONFIG)).eval().to(torch.bfloat16)
    kernels = kernel_candidates(model)
    step = decode_step(model, kernels["int8-cpp"], rows=2)
    cache = preallocated_cache(model, 3, torch.int8)
    for _ in range(3):
        step(torch.tensor([4, 5]), cache)
    with pytest.raises(ValueError, match="slide the window"):
        step(torch.tensor([4, 5]), cache)
    for layer in cache.layers:
        layer.rewind(1)
    with pytest.raises(ValueError, match="steps 3 rows over"):
        step(torch.tensor([4, 5, 6]), cache)
    with pytest.raises(ValueError, match="over a torch.bfloat16 cache"):
        decode_step(model, kernels["bf16-cpp"], rows=2)(torch.tensor([4, 5]), cache)


@pytest.mark.skipif(platform.system() != "Linux", reason="GOMP_CPU_AFFINITY is GNU OpenMP's (Linux)")
def test_the_cpp_step_runs_on_one_thread_when_its_threads_would_share_a_core():
    """The case of a machine whose other cores are busy, made certain: GNU OpenMP told to put both threads on core 0
    (GOMP_CPU_AFFINITY="0 0"), where each parallel region waits for a thread spinning on the same core (~170 ms a
    step instead of ~0.3). After its first steps the C++ step runs on one thread, trying two again at most about
    1/SHARE of the time."""
    import subprocess
    import sys

    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from gpt2zh.decoding import decode_step, kernel_candidates, preallocated_cache
from gpt2zh.model import build_model, load_config
torch.set_num_threads(2)
model = build_model(load_config({str(ROOT / "config" / "model_config_quick.json")!r})).eval().to(torch.bfloat16)
step = decode_step(model, kernel_candidates(model)["int8-cpp"])
cache = preallocated_cache(model, 64, torch.int8)
counts, choose = [], step.threads.choose
step.threads.choose = lambda: counts.append(choose()) or counts[-1]
for position in range(60):
    step(torch.tensor([position % 7]), cache)
print(counts)
"""
    env = {**os.environ, "GOMP_CPU_AFFINITY": "0 0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    counts = eval(result.stdout)
    assert counts[:8] == [2] * 4 + [1] * 4 and counts[8:].count(1) >= 50, counts


def test_the_sampling_loop_runs_torchs_own_ops_on_the_cpp_steps_thread_count():
    """On a busy machine torch's ops in the loop (logits processors, draw, re-encoding) wait for each other's threads
    as the C++ step's regions do: they run on the count the step last ran on, and torch has its count back after
    sampling, also when it is stopped."""
    from gpt2zh.decoding import decode_step, kernel_candidates
    from gpt2zh.sampling import Processors

    model = build_model(load_config(TINY_CONFIG)).eval().to(torch.bfloat16)
    process = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        step = decode_step(model, kernel_candidates(model)["int8-cpp"], rows=2)
        step.threads.choose = lambda: 1  # as on a busy machine
        seen = []
        processors = Processors([lambda ids, scores: seen.append(torch.get_num_threads()) or scores])
        sample(model, [5, 6, 7], 6, 2, processors, n_ctx=32, step=step)
        assert seen == [2] + [1] * 5 and torch.get_num_threads() == 2  # the prefix is encoded before any step

        def stop(ids):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            sample(model, [5, 6, 7], 6, 2, processors, n_ctx=32, step=step, on_step=stop)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(process)


def test_the_thread_count_follows_the_machine_and_spends_little_on_trying_the_other(monkeypatch):
    """ThreadCount against step times it is told: on a quiet machine (two threads 1 ms, one 1.6 ms, now and then a
    step of 30 ms) every step after the first ones on two threads; while two threads share a core (170 ms against
    0.3 ms) every step on one but the tries of two, which take at most TRIES/SHARE of the time; when the load goes,
    back to two; when two threads slow down past one's time, one."""
    from gpt2zh.native import ThreadCount

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)

    def run(step_seconds, steps, counter=None, outlier_every=0):
        """[(threads, seconds)] of each step (of a new counter: after each count's first ones), and the counter"""
        first = 0 if counter else 2 * (ThreadCount.TRIES + 1)
        counter = counter or ThreadCount()
        steps_run = []
        for index in range(steps):
            threads = counter.choose()
            seconds = 0.030 if outlier_every and index % outlier_every == 0 else step_seconds[threads]
            counter.record(threads, seconds)
            steps_run.append((threads, seconds))
        return steps_run[first:], counter

    quiet, busy = {2: 1e-3, 1: 1.6e-3}, {2: 0.170, 1: 0.3e-3}
    steps_run, quiet_counter = run(quiet, 20000, outlier_every=97)
    assert all(threads == 2 for threads, _ in steps_run)
    steps_run, counter = run(busy, 200000)
    tried = sum(seconds for threads, seconds in steps_run if threads == 2)
    assert 0 < tried < sum(seconds for _, seconds in steps_run) * ThreadCount.TRIES / ThreadCount.SHARE
    steps_run, _ = run(quiet, 30000, counter)  # the load has gone
    assert [threads for threads, _ in steps_run[-1000:]].count(2) == 1000
    steps_run, _ = run({2: 2e-3, 1: 1.6e-3}, 10, quiet_counter)  # two threads slowed down
    chosen = [threads for threads, _ in steps_run]
    assert chosen == [2, 2, 1, 1, 1, 1, 1, 1, 1, 1]  # once the median of three is 2 ms


def test_a_trial_times_the_cpp_step_once_it_has_timed_its_thread_counts():
    """The trial's timed steps are a run's steps: the C++ step's first ones, which try each thread count, are part
    of its warm-up."""
    from gpt2zh.decoding import kernel_candidates, prepare_entrant

    model = build_model(load_config(TINY_CONFIG)).eval().to(torch.bfloat16)
    for name in ("bf16-cpp", "int8-cpp"):
        step, _, _ = prepare_entrant(model, kernel_candidates(model)[name], 1, 8, {}, {})
        assert step.threads.settled(), name
