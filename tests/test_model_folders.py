"""Model folders users bring (the original GPT2-Chinese's, the Hugging Face layout) and ours used with plain
transformers: ids and decoded text, not only that loading succeeds."""
import re

import pytest
import torch
from conftest import run, train_args
from foreign_folders import greedy_text, write_hugging_face_folder, write_original_folder


def sample_text(out):
    return re.findall(r"SAMPLE 1 =+\n\n(.*)\n", out)[0]


def greedy_generate(cwd, model_path, *flags, length=12):
    return run("generate.py", "--device", "cpu", "--precision", "fp32", "--model_path", model_path, "--topk", "1",
               "--length", length, "--nsamples", "1", "--prefix", "悟空", *flags, cwd=cwd).stdout


@pytest.fixture
def original(project):
    """An original GPT2-Chinese folder and its vocabulary file in the project folder."""
    model, tokens = write_original_folder(project / "original_model", project / "vocab_original.txt")
    assert tokens.index("[CLS]") == 101  # the BERT-Chinese layout, unlike ours
    return model, tokens


def test_an_original_gpt2_chinese_folder_continues_with_its_own_vocabulary(project, original):
    import shutil

    model, tokens = original
    expected = greedy_text(model, tokens, ["悟", "空"], 12)[1]
    out = greedy_generate(project, "original_model", "--tokenizer_path", "vocab_original.txt")
    assert sample_text(out) == expected
    assert "warn" not in out.lower() and "UNEXPECTED" not in out
    # The vocabulary copied into the folder as vocab.txt, with no tokenizer_config.json naming its class: read as
    # the BERT-style vocabulary it is (AutoTokenizer would follow config.json to GPT-2's tokenizer, or fail).
    shutil.copy(project / "vocab_original.txt", project / "original_model" / "vocab.txt")
    assert sample_text(greedy_generate(project, "original_model")) == expected


@pytest.mark.parametrize("flags,message", [
    ([], "has no vocabulary saved with it (a folder of the original GPT2-Chinese?); give the one it was trained "
         "with"),
    (["--tokenizer_path", "cache/vocab_small.txt"], "--tokenizer_path cache/vocab_small.txt is not the vocabulary of "
                                                    "original_model (13317 tokens for a model of vocab_size 408)"),
])
def test_an_original_folder_with_a_wrong_or_no_vocabulary_is_refused(project, original, flags, message):
    result = run("generate.py", "--device", "cpu", "--model_path", "original_model", *flags, cwd=project, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_hugging_face_folder_continues_with_its_vocab_txt(project):
    model, tokens = write_hugging_face_folder(project / "hf_model")
    out = greedy_generate(project, "hf_model")
    assert sample_text(out) == greedy_text(model, tokens, ["悟", "空"], 12)[1]
    result = run("generate.py", "--device", "cpu", "--model_path", "hf_model", "--tokenizer_path",
                 "cache/vocab_small.txt", cwd=project, check=False)
    assert result.returncode == 2 and "is not the vocabulary the model was trained with" in result.stderr


def test_a_folder_that_records_other_special_ids_refuses_a_vocabulary_from_outside(trained, tmp_path):
    """Our folders record [MASK] [CLS] [PAD]'s ids: a vocabulary of the same size with other ids is refused."""
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained / "model" / "final_model", work / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (work / "bare" / name).unlink()
    lines = (trained / "cache" / "vocab_small.txt").read_text(encoding="utf-8").split("\n")
    lines[2], lines[3] = lines[3], lines[2]  # [CLS] and [SEP] swapped
    (work / "swapped.txt").write_text("\n".join(lines), encoding="utf-8")
    result = run("generate.py", "--device", "cpu", "--model_path", "bare", "--tokenizer_path", "swapped.txt",
                 cwd=work, check=False)
    assert result.returncode == 2 and "--tokenizer_path swapped.txt is not the vocabulary of bare ([CLS] is id 3 " \
                                      "there but 2 in the model)" in result.stderr, result.stderr
    run("generate.py", "--device", "cpu", "--model_path", "bare", "--tokenizer_path",
        str(trained / "cache" / "vocab_small.txt"), "--length", "5", "--nsamples", "1", cwd=work)


@pytest.mark.parametrize("layout", ["original", "hugging_face"])
def test_fine_tuning_a_released_model_is_one_command(prepared, layout):
    if layout == "original":
        write_original_folder(prepared / "released", prepared / "vocab_original.txt")
        vocabulary = {"--tokenizer_path": "vocab_original.txt"}
    else:
        write_hugging_face_folder(prepared / "released")
        vocabulary = {"--tokenizer_path": None}
    out = run("train.py", *train_args(**{"--epochs": 1, **vocabulary}), "--pretrained_model", "released", "--raw",
              cwd=prepared).stdout
    assert "--pretrained_model released: its own config (n_ctx 64, vocab_size 408" in out
    assert '"n_embd": 32' in out and '"n_positions": 64' in out  # the checkpoint's, not tiny config's n_ctx 32
    from gpt2zh.vocab import folder_tokenizer, load_tokenizer, vocab_tokens

    released = load_tokenizer(prepared / "vocab_original.txt") if layout == "original" else \
        folder_tokenizer(prepared / "released")
    saved = folder_tokenizer(prepared / "model" / "final_model")
    assert vocab_tokens(saved) == vocab_tokens(released) and saved.convert_tokens_to_ids("[CLS]") == 101
    out = greedy_generate(prepared, "model/final_model", length=5)  # no --tokenizer_path needed any more
    assert len(sample_text(out)) == 7
    result = run("train.py", *train_args(**{"--epochs": 1, "--tokenizer_path": "cache/vocab_small.txt"}),
                 "--pretrained_model", "released", "--output_dir", "other", cwd=prepared, check=False)
    assert result.returncode == 2 and "cache/vocab_small.txt" in result.stderr and "released" in result.stderr


def test_our_folder_with_plain_transformers_continues_like_generate_py(trained):
    """Greedy decoding through AutoModelForCausalLM + AutoTokenizer, model.generate and the text-generation
    pipeline gives the tokens of `generate.py --topk 1 --stop_at_end` (plain generate stops at the end of an
    article, [CLS], as --stop_at_end does)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from gpt2zh.articles import ids_to_text

    folder = trained / "model" / "final_model"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.model_max_length == 32 and model.generation_config.eos_token_id == 2  # [CLS], the article end
    prefix = "小明把带来的馒头"
    encoded = tokenizer(prefix, return_tensors="pt")
    assert list(encoded) == ["input_ids", "attention_mask"]
    with torch.no_grad():
        torch.testing.assert_close(model(**encoded).logits, model(input_ids=encoded["input_ids"]).logits)
        plain = model.generate(**tokenizer(prefix, add_special_tokens=False, return_tensors="pt"), do_sample=False,
                               max_new_tokens=20)[0].tolist()
    piped = pipeline("text-generation", model=model, tokenizer=tokenizer)(
        prefix, max_new_tokens=20, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert list(piped) == plain
    out = run("generate.py", "--device", "cpu", "--precision", "fp32", "--topk", "1", "--length", "20", "--nsamples",
              "1", "--stop_at_end", "--prefix", prefix, "--seed", "0", cwd=trained).stdout
    assert sample_text(out + "\n") == ids_to_text(tokenizer, plain)


def last_logits(model, ids):
    """The logits after ids [B, T] as generate.py computes them (encode_tokens over a fresh cache)."""
    from gpt2zh.decoding import preallocated_cache
    from gpt2zh.inference import encode_tokens

    return encode_tokens(model, ids, preallocated_cache(model, ids.shape[1]))


def test_folders_of_the_original_and_the_hugging_face_layout_sample_alike_through_every_kernel(tmp_path, monkeypatch):
    """An original GPT2-Chinese folder (transformers 2.x config and state dict) and a Hugging Face one, loaded as
    generate.py loads them (the same logits as the written model), then every weight moved by noise so that no layer
    is negligible, cast to bf16: every sampling kernel the trial can pick on this machine — the C++ step included —
    continues a sequence with the logits of that model's fp32 forward, within 3% of their range."""
    import copy

    from gpt2zh.checkpoints import open_model_folder
    from gpt2zh.decoding import decode_step, kernel_candidates, preallocated_cache
    from gpt2zh.inference import encode_tokens, load_sampling_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    written = {"original": write_original_folder(tmp_path / "original", tmp_path / "vocab.txt")[0],
               "hugging face": write_hugging_face_folder(tmp_path / "hf")[0]}
    folders = {"original": (tmp_path / "original", tmp_path / "vocab.txt"), "hugging face": (tmp_path / "hf", None)}
    sequence = torch.tensor([[110, 120, 130, 140, 150, 160, 170, 180, 190, 200]] * 2)
    for layout, (folder, vocabulary) in folders.items():
        loaded = load_sampling_model(folder, open_model_folder(folder, vocabulary)[0])
        torch.manual_seed(0)
        with torch.no_grad():
            torch.testing.assert_close(last_logits(loaded, sequence[:1]),
                                       written[layout](input_ids=sequence[:1]).logits[:, -1])
            for parameter in loaded.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)
            reference = torch.cat([last_logits(loaded, sequence[:1, :end]) for end in range(6, 11)])  # [5, vocab]
        model = copy.deepcopy(loaded).to(torch.bfloat16)
        candidates = kernel_candidates(model)
        assert "bf16-cpp" in candidates
        for name, kernel in candidates.items():
            step = decode_step(model, kernel, rows=2)
            cache = preallocated_cache(model, 16, kernel.cache_dtype)
            logits = [encode_tokens(model, sequence[:, :6], cache)]
            logits += [step(sequence[:, position], cache) for position in range(6, 10)]
            error = (torch.stack(logits, dim=1).float() - reference).abs().max() / (reference.max() - reference.min())
            assert error < 0.03, (layout, name, error.item())


@pytest.mark.parametrize("saved_by", ["GPT2LMHeadModel", "GPT2Model"])
def test_a_folder_loads_for_sampling_with_the_logits_transformers_gives_it(tmp_path, saved_by):
    """generate.py reads the weights without transformers' model (gpt2zh.inference): a folder saved from the LM
    (safetensors, the head tied) or from the bare GPT2Model (OpenAI's GPT-2: no `transformer.` in its names) gives
    the logits transformers' from_pretrained model gives; one whose weights do not fit its config.json is refused."""
    import json

    from foreign_folders import tiny_gpt2
    from transformers import GPT2LMHeadModel

    from gpt2zh.errors import UserError
    from gpt2zh.inference import SamplingGPT2, load_sampling_model
    from gpt2zh.model import load_config

    model = tiny_gpt2(300, seed=2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    (model if saved_by == "GPT2LMHeadModel" else model.transformer).save_pretrained(tmp_path / "folder")
    config = load_config(tmp_path / "folder" / "config.json")
    loaded = load_sampling_model(tmp_path / "folder", config)
    assert isinstance(loaded, SamplingGPT2)
    expected = GPT2LMHeadModel.from_pretrained(tmp_path / "folder").eval()
    ids = torch.tensor([[5, 150, 250, 7, 99]])
    with torch.no_grad():
        torch.testing.assert_close(last_logits(loaded, ids), expected(input_ids=ids).logits[:, -1])
    settings = json.loads((tmp_path / "folder" / "config.json").read_text())
    (tmp_path / "folder" / "config.json").write_text(json.dumps({**settings, "n_embd": 64}))
    with pytest.raises(UserError, match="its weights do not fit its config.json"):
        load_sampling_model(tmp_path / "folder", load_config(tmp_path / "folder" / "config.json"))
