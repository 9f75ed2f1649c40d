import json
import re

import pytest
from conftest import run

REFERENCE = ["--device", "1", "--length", "40", "--tokenizer_path", "cache/vocab_small.txt", "--model_path",
             "model/final_model", "--prefix", "[CLS]悟空大喝一声", "--topp", "1", "--temperature", "1.0",
             "--save_samples", "--save_samples_path", "./mnt/"]


def test_reference_command_writes_ten_different_samples(trained):
    out = run("generate.py", *REFERENCE, "--seed", "3", cwd=trained).stdout
    saved = (trained / "mnt" / "samples.txt").read_text(encoding="utf-8")
    blocks = re.findall(r"=+ SAMPLE (\d+) =+\n(.*?)\n=+\n", saved, flags=re.S)
    assert [int(n) for n, _ in blocks] == list(range(1, 11))
    texts = [text for _, text in blocks]
    assert all(t.startswith("悟空大喝一声") for t in texts) and len(set(texts)) == 10
    assert "[UNK]" not in saved and "[MASK]" not in saved and "[CLS]" not in saved
    assert "SAMPLE 10" in out and "device: CPU" in out


def test_same_seed_same_samples_and_uneven_batches_end(trained):
    first = run("generate.py", *REFERENCE, "--seed", "5", "--nsamples", "5", "--batch_size", "2", cwd=trained).stdout
    second = run("generate.py", *REFERENCE, "--seed", "5", "--nsamples", "5", "--batch_size", "2", cwd=trained).stdout

    def samples(out):
        return re.findall(r"SAMPLE \d+ =+\n\n(.*)", out)

    assert len(samples(first)) == 5 and samples(first) == samples(second)
    # the 1-row batch at the end has its own kernel trial: its line comes before the streamed text, not inside it
    assert not any("sampling kernel" in text for text in samples(first))


def test_length_beyond_n_ctx_slides(trained):
    out = run("generate.py", "--device", "cpu", "--length", "100", "--nsamples", "2", "--prefix", "悟空",
              "--seed", "1", cwd=trained).stdout
    assert "2 samples x 100 tokens" in out


def test_missing_prefix_characters_are_named(trained):
    out = run("generate.py", "--device", "cpu", "--length", "5", "--nsamples", "1", "--prefix", "悟空\U00020000",
              cwd=trained).stdout
    assert "not in the vocabulary and become [UNK]: \U00020000" in out


@pytest.mark.parametrize("flags,message", [
    (["--length", "0"], "--length 0: must be positive"),
    (["--topp", "1.5"], "--topp 1.5: must be in (0, 1]"),
    (["--topk", "-1"], "--topk -1: must be 0 (off) or more"),
    (["--temperature", "0"], "--temperature 0.0: must be greater than 0"),
    (["--repetition_window", "-1"], "--repetition_window -1: must be 0 (all tokens) or more"),
    (["--model_path", "model/final_model/model.safetensors"], "is a file; give the folder that holds it"),
    (["--model_path", "empty"], "--model_path empty: has no config.json"),
    (["--model_path", "nowhere"], "--model_path nowhere: does not exist"),
    (["--tokenizer_path", "other_vocab.txt"], "is not the vocabulary the model was trained with"),
])
def test_bad_generation_flags(trained, flags, message):
    (trained / "empty").mkdir(exist_ok=True)
    (trained / "other_vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n我\n", encoding="utf-8")
    result = run("generate.py", "--device", "cpu", "--nsamples", "1", *flags, cwd=trained, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_eval_reproduces_the_held_out_loss_of_training(trained):
    rows = [json.loads(line) for line in (trained / "model" / "metrics.jsonl").read_text().splitlines()]
    during_training = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    ran = run("eval.py", "--pretrained_model", "model/final_model", "--raw_data_path", "data/eval.json", "--raw",
              "--device", "cpu", "--num_pieces", "1", "--min_length", "10", "--precision", "fp32", cwd=trained)
    out = ran.stdout
    assert "[transformers]" not in ran.stderr and "warn" not in (out + ran.stderr).lower()  # padded batches too
    result = json.loads((trained / "eval_result" / "result.json").read_text())
    assert "using 16" in out  # --stride 768 > n_ctx 32 becomes n_ctx // 2, as in training
    assert abs(result["loss"] - during_training) < 1e-4
    assert result["perplexity"] > 1 and result["loss_per_char"] > 0


def test_eval_without_pieces_says_to_add_raw(trained):
    result = run("eval.py", "--device", "cpu", "--tokenized_data_path", "nowhere/", cwd=trained, check=False)
    assert result.returncode == 2 and "add --raw" in result.stderr


def test_rows_beyond_a_small_vocabulary_are_never_sampled(trained, tmp_path):
    """A corpus vocabulary smaller than the config's vocab_size leaves rows that name no token."""
    import shutil

    from conftest import train_args

    work = tmp_path / "w"
    shutil.copytree(trained, work, ignore=shutil.ignore_patterns("model", "mnt", "eval_result"))
    run("cache/make_vocab.py", "--from_json", "data/train.json", "--output", "data/vocab.txt", cwd=work)
    run("train.py", *train_args(**{"--tokenizer_path": "data/vocab.txt", "--epochs": 1}), "--raw", cwd=work)
    out = run("generate.py", "--device", "cpu", "--length", "60", "--nsamples", "4", "--topk", "0", "--prefix",
              "小明", "--seed", "0", cwd=work).stdout
    assert out.count(" SAMPLE ") == 4


def test_generate_starts_the_cpp_build_before_it_imports_torch(tmp_path):
    """On a machine's first run the compiler (3.6 s on a Zen 3 core) runs while torch is imported (1-4 s): the build
    is started before, and a forced PyTorch kernel starts none."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    script = """
import sys
sys.path.insert(0, sys.argv[1])
from gpt2zh import native_build
native_build.start_building = lambda: print("build started; torch imported:", "torch" in sys.modules)
sys.argv = ["generate.py", "--model_path", "no_such_model", *sys.argv[2:]]
import generate
generate.run_cli(generate.main)
"""
    for flags, started in (([], True), (["--sampling_kernel", "int8-cpp"], True),
                           (["--sampling_kernel", "fp32-sdpa"], False)):
        result = subprocess.run([sys.executable, "-c", script, str(ROOT), *flags], capture_output=True, text=True,
                                cwd=tmp_path, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)}, timeout=600)
        assert result.returncode == 2 and "no_such_model: does not exist" in result.stderr, result.stderr
        lines = [line for line in result.stdout.splitlines() if line.startswith("build started")]
        assert lines[:1] == (["build started; torch imported: False"] if started else [])  # the Writer's call later
