import itertools
import json
import re
import shutil

import pytest
import torch
from conftest import STORY, TINY_CONFIG, run, train_args
from safetensors.torch import load_file


def test_pipeline_trains_and_saves_loadable_folders(trained):
    model_dir = trained / "model"
    assert {"model_epoch1", "model_epoch2", "final_model", "checkpoint"} <= {p.name for p in model_dir.iterdir()}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir / "final_model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "final_model")
    assert (model_dir / "final_model" / "model.safetensors").is_file()
    encoded = tokenizer("悟空")  # as GPT-2 wants it: no [CLS] ... [SEP] around it, no token_type_ids
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == ["悟", "空"] and "token_type_ids" not in encoded
    assert model.config.n_ctx == 32
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert train_losses[-1] < train_losses[0]
    assert len([r for r in rows if "eval_loss" in r]) == 2
    manifest = json.loads((trained / "data" / "tokenized" / "manifest.json").read_text())
    assert manifest["num_pieces"] == 2 and manifest["unk_tokens"] == 0


def test_prints_what_a_user_watches(trained, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(trained, work, ignore=shutil.ignore_patterns("model"))
    out = run("train.py", *train_args(**{"--epochs": 1}), cwd=work).stdout
    assert "number of parameters:" in out and "device: CPU" in out and "saved model/final_model" in out
    assert "Traceback" not in out and "warn" not in out.lower()


def test_device_ids_without_gpus_fall_back_to_cpu(prepared):
    out = run("train.py", *train_args(**{"--device": "0,1", "--epochs": 1}), "--raw", cwd=prepared).stdout
    assert "device: CPU (--device 0,1 names GPUs, but this machine has none)" in out


@pytest.mark.parametrize("flags,message", [
    ({"--stride": 0}, "--stride 0: must be between 1 and n_ctx (32)"),
    ({"--stride": 33}, "--stride 33: must be between 1 and n_ctx (32)"),
    ({"--num_pieces": 0}, "--num_pieces 0: must be at least 1"),
    ({"--device": "gpu0"}, "--device gpu0: GPU ids are whole numbers"),
    ({"--model_config": "config/nope.json"}, "config/nope.json: model config not found"),
    ({"--tokenizer_path": "cache/nope.txt"}, "cache/nope.txt: vocabulary not found"),
    ({"--min_length": 100000}, "shorter than --min_length 100000 characters (the longest has"),
])
def test_bad_training_flags(prepared, flags, message):
    result = run("train.py", *train_args(**flags), "--raw", cwd=prepared, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (prepared / "model").exists()


def test_vocabulary_larger_than_the_config(prepared):
    config = json.loads(TINY_CONFIG.read_text())
    (prepared / "small.json").write_text(json.dumps({**config, "vocab_size": 100}))
    result = run("train.py", *train_args(**{"--model_config": "small.json"}), "--raw", cwd=prepared, check=False)
    assert result.returncode == 2 and "has 13317 tokens but small.json has vocab_size 100" in result.stderr


def test_stale_or_missing_pieces_without_raw(prepared):
    result = run("train.py", *train_args(), cwd=prepared, check=False)
    assert result.returncode == 2 and "no tokenized pieces; add --raw" in result.stderr
    run("train.py", *train_args(**{"--epochs": 1}), "--raw", cwd=prepared)
    with (prepared / "data" / "train.json").open("a") as f:
        f.write(" ")
    result = run("train.py", *train_args(), "--overwrite", cwd=prepared, check=False)
    assert result.returncode == 2 and "stale: the corpus data/train.json changed" in result.stderr


def test_a_previous_run_is_never_overwritten_silently(prepared):
    run("train.py", *train_args(**{"--epochs": 1}), "--raw", cwd=prepared)
    weights = (prepared / "model" / "final_model" / "model.safetensors").read_bytes()
    result = run("train.py", *train_args(**{"--epochs": 1}), cwd=prepared, check=False)
    assert result.returncode == 2 and "holds a previous run (checkpoint, final_model, model_epoch1)" in result.stderr
    assert (prepared / "model" / "final_model" / "model.safetensors").read_bytes() == weights
    out = run("train.py", *train_args(**{"--epochs": 1, "--seed": 7}), "--overwrite", cwd=prepared).stdout
    assert "--overwrite: deleting the previous run" in out


def test_corpus_shorter_than_n_ctx_trains_on_what_there_is(project):
    (project / "data" / "story.txt").write_text("第一回 短\n只有一句话而已。", encoding="utf-8")
    run("txt_to_json.py", cwd=project)
    run("clr_ctrl.py", cwd=project)
    out = run("train.py", *train_args(**{"--num_pieces": 1, "--epochs": 1}), "--raw", cwd=project).stdout
    assert "fewer than n_ctx 32; training on what there is" in out
    assert (project / "model" / "final_model").is_dir()


def test_out_of_memory_suggests_a_smaller_batch(prepared, monkeypatch):
    import gpt2zh.training as training
    from gpt2zh.errors import UserError
    from train import parse_args

    class Exhausted(training.CausalLMLoss):
        def forward(self, input_ids, labels):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes")

    monkeypatch.setattr(training, "CausalLMLoss", Exhausted)
    monkeypatch.chdir(prepared)
    with pytest.raises(UserError, match="out of memory on cpu with --batch_size 4; lower --batch_size and raise "
                                        "--gradient_accumulation .*--batch_size 2 --gradient_accumulation 2"):
        training.train(parse_args(train_args() + ["--raw"]))


def test_reference_commands_run_as_written(tmp_path):
    """The original README's train and generate commands, verbatim but for --epochs 1, on our sample novel."""
    from conftest import ROOT

    shutil.copytree(ROOT / "config", tmp_path / "config")
    shutil.copytree(ROOT / "cache", tmp_path / "cache")
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "examples" / "sample_novel.txt", tmp_path / "data")
    run("txt_to_json.py", cwd=tmp_path)
    run("clr_ctrl.py", cwd=tmp_path)
    out = run("train.py", "--model_config", "config/model_config_small.json", "--tokenized_data_path",
              "data/tokenized/", "--tokenizer_path", "cache/vocab_small.txt", "--raw_data_path", "data/train.json",
              "--epochs", "1", "--log_step", "200", "--stride", "512", "--output_dir", "model/", "--device", "0,1",
              "--num_pieces", "100", "--raw", cwd=tmp_path).stdout
    assert "number of parameters: 81894144" in out and '"n_layer": 10' in out
    out = run("generate.py", "--device", "1", "--length", "1000", "--tokenizer_path", "cache/vocab_small.txt",
              "--model_path", "model/final_model", "--prefix", "[CLS]悟空大喝一声", "--topp", "1",
              "--temperature", "1.0", "--save_samples", "--save_samples_path", "./mnt/", cwd=tmp_path).stdout
    assert "10 samples x 1000 tokens" in out
    assert (tmp_path / "mnt" / "samples.txt").read_text(encoding="utf-8").count(" SAMPLE ") == 10


@pytest.mark.parametrize("schedule, at_quarter, at_half, at_nine_tenths",
                         [("linear", 0.75, 0.5, 0.1), ("cosine", 0.8536, 0.5, 0.0245), ("wsd", 1.0, 1.0, 0.5)])
def test_learning_rate_schedules(schedule, at_quarter, at_half, at_nine_tenths):
    """Warm-up to the peak over 100 steps, then the decay to 0 at step 1,100: wsd holds the peak until the last fifth
    of the 1,000 steps after warm-up (step 900) and decays linearly from there."""
    from gpt2zh.optimizers import lr_factor

    factors = [lr_factor(step, 100, 1100, schedule) for step in range(1101)]
    assert factors[0] == 0.0 and factors[50] == 0.5 and factors[100] == 1.0
    assert [round(factors[step], 4) for step in (350, 600, 1000)] == [at_quarter, at_half, at_nine_tenths]
    assert factors[1100] == 0.0 and all(a >= b for a, b in itertools.pairwise(factors[100:]))
    if schedule == "wsd":
        assert factors[900] == 1.0 and factors[901] < 1.0


def test_weight_average_is_the_mean_of_the_weights_it_saw():
    from gpt2zh.optimizers import WeightAverage

    models = [torch.nn.Linear(3, 2) for _ in range(3)]
    average = WeightAverage(models[0])
    for model in models:
        average.update(model)
    for name, value in average.model.named_parameters():
        expected = sum(dict(m.named_parameters())[name] for m in models) / 3
        torch.testing.assert_close(value, expected)
        assert not value.requires_grad


def test_weight_average_reaches_the_model_inside_the_wrappers_train_py_uses():
    """The average follows the weights train.py trains behind DataParallel (--device 0,1) and CausalLMLoss, and its
    output layer stays tied to the token table (as saved folders need)."""
    from gpt2zh.checkpoints import unwrap
    from gpt2zh.model import CausalLMLoss, build_model, load_config
    from gpt2zh.optimizers import WeightAverage

    lm = build_model(load_config(TINY_CONFIG))
    wrapped = torch.nn.DataParallel(CausalLMLoss(lm, torch.float16))
    average = WeightAverage(lm)
    with torch.no_grad():
        lm.transformer.wte.weight.add_(1.0)
    average.update(unwrap(wrapped))
    torch.testing.assert_close(average.model.transformer.wte.weight, lm.transformer.wte.weight)
    assert average.model.lm_head.weight is average.model.transformer.wte.weight  # still tied when saved


def test_average_from_saves_and_reports_the_averaged_weights(prepared):
    (prepared / "data" / "eval.json").write_text(json.dumps([STORY], ensure_ascii=False), encoding="utf-8")
    out = run("train.py", *train_args(**{"--batch_size": 2}), "--raw", "--average_from", "0.5", "--keep_best",
              "--eval_data_path", "data/eval.json", cwd=prepared).stdout
    reported = re.findall(r"epoch 2: held-out loss ([\d.]+) \(([\d.]+) nats per character\) of the average of the "
                          r"weights after steps (\d+)-(\d+)", out)
    assert len(reported) == 1 and "epoch 1: held-out loss" in out, out
    loss, _, first, last = reported[0]
    assert int(first) > 1 and f"steps {first}-{last}; model_epoch2 holds the last weights" in out
    final = load_file(prepared / "model" / "final_model" / "model.safetensors")
    last_weights = load_file(prepared / "model" / "model_epoch2" / "model.safetensors")
    assert any(not torch.equal(final[name], last_weights[name]) for name in final)
    run("eval.py", "--pretrained_model", "model/final_model", "--raw_data_path", "data/eval.json", "--raw",
        "--device", "cpu", "--num_pieces", "1", "--min_length", "10", "--stride", "16", "--precision", "fp32",
        cwd=prepared)
    result = json.loads((prepared / "eval_result" / "result.json").read_text())
    assert abs(result["loss"] - float(loss)) < 1e-3
    result = run("train.py", *train_args(), "--average_from", "1", "--overwrite", cwd=prepared, check=False)
    assert result.returncode == 2 and "--average_from 1.0: must be in [0, 1)" in result.stderr


def test_compile_that_cannot_build_trains_without_it(prepared):
    """--compile (advised for GPUs) where torch.compile cannot build (no C++ compiler for its CPU code, as on a
    Windows machine without one): one line says so and the run trains without it."""
    result = run("train.py", *train_args(**{"--epochs": 1}), "--raw", "--compile", cwd=prepared,
                 env={"CXX": str(prepared / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(prepared / "inductor")})
    assert "--compile: torch.compile cannot build the model here (InductorError: " in result.stdout
    assert "training without it" in result.stdout and (prepared / "model" / "final_model").is_dir()


def test_device_mps_is_chosen_where_there_is_one_and_explained_where_there_is_none(monkeypatch):
    """Apple Silicon (simulated: torch.backends.mps.is_available mocked; the Mac path is untested on real hardware):
    --device mps takes the Apple GPU, the default GPU ids fall back to it before the CPU, and asking for it where there
    is none is one clear line. Its precision is fp32 unless bf16 is asked for (macOS 14 or later)."""
    from gpt2zh.devices import autocast_dtype, pick_device
    from gpt2zh.errors import UserError

    said = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("mps", say=said.append)[0].type == "mps"
    assert pick_device("0,1,2,3", say=said.append)[0].type == "mps" and "names CUDA GPUs" in said[-1]
    assert pick_device("cpu", say=said.append)[0].type == "cpu"
    assert autocast_dtype(torch.device("mps"), "auto", fp16=False) is None
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("0,1,2,3", say=said.append)[0].type == "cpu"
    with pytest.raises(UserError, match="--device mps: this machine has no Apple GPU"):
        pick_device("mps", say=said.append)


@pytest.mark.parametrize("script", ["train.py", "generate.py", "eval.py"])
def test_device_mps_without_an_apple_gpu_is_one_line(prepared, script):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    result = run(script, "--device", "mps", cwd=prepared, check=False)
    assert result.returncode == 2 and "--device mps: this machine has no Apple GPU" in result.stderr
    assert "Traceback" not in result.stderr
