"""export_gguf.py: the tiny trained model in llama.cpp (through llama-cpp-python) writes what generate.py writes."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import run

pytest.importorskip("gguf", reason="the GGUF extra is not installed (pip install -r requirements-gguf.txt)")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (requirements-gguf.txt)")

PROMPT = "小明每天"


def load(path):
    return llama_cpp.Llama(str(path), n_ctx=32, logits_all=True, verbose=False, seed=0)


def test_llama_cpp_continues_greedily_as_generate_py_does_token_for_token_and_as_text(trained):
    from gpt2zh.articles import encode_prefix
    from gpt2zh.sampling import Writer

    run("export_gguf.py", "--model_path", "model/final_model", "--dtype", "f32", "--output", "tiny-f32.gguf",
        cwd=trained)
    llm = load(trained / "tiny-f32.gguf")
    writer = Writer(trained / "model" / "final_model", precision="fp32", kernel="fp32-sdpa", say=lambda line: None)
    prompt_ids = encode_prefix(writer.tokenizer, PROMPT)
    assert llm.tokenize(PROMPT.encode(), special=True) == prompt_ids  # nothing added around a prompt
    ours = writer.write(prompt_ids, 20, 1, writer.processors(1.0, 0, 0, 1.0), 0, stop_at_end=True, greedy=True)[0]
    theirs = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if token == llm.token_eos() or len(theirs) == 20:
            break
    assert theirs == ours[len(prompt_ids):]
    text = llm.create_completion(PROMPT, max_tokens=20, temperature=0, top_k=1)["choices"][0]["text"]
    run("generate.py", "--device", "cpu", "--precision", "fp32", "--prefix", PROMPT, "--nsamples", "1", "--length",
        "20", "--topk", "1", "--stop_at_end", "--seed", "0", "--save_samples", "--save_samples_path", "mnt_gguf",
        cwd=trained)
    saved = re.findall(r"SAMPLE 1 =+\n(.*?)\n=+\n", (trained / "mnt_gguf" / "samples.txt").read_text(encoding="utf-8"),
                       flags=re.S)[0]
    assert saved == (PROMPT + text).strip()


def test_f32_logits_agree_and_quantized_files_run(trained):
    from gpt2zh.checkpoints import load_model_folder

    model, tokenizer = load_model_folder(trained / "model" / "final_model")
    sequence = tokenizer.convert_tokens_to_ids(list("小明每天早上都到河边读书，他说"))
    with torch.no_grad():
        reference = model.float().eval()(input_ids=torch.tensor([sequence])).logits[0].numpy()
    spread = reference.max() - reference.min()
    for dtype, tolerance in (("f32", 1e-4), ("f16", 2e-3), ("q8_0", 2e-2)):
        run("export_gguf.py", "--model_path", "model/final_model", "--dtype", dtype, "--output", f"tiny-{dtype}.gguf",
            cwd=trained)
        llm = load(trained / f"tiny-{dtype}.gguf")
        llm.eval(sequence)
        logits = np.array(llm.scores[:len(sequence)])[:, :reference.shape[1]]
        error = np.abs(logits - reference).max() / spread  # ggml's gelu reads an fp16 table: not bit-exact
        assert error < tolerance, (dtype, error)


def test_q8_0_needs_widths_in_blocks_of_32(trained, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(trained / "model" / "final_model", folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["n_embd"] % 32 == 0
    from gpt2zh.checkpoints import load_model_folder
    from gpt2zh.gguf_export import check_shapes

    model_config = load_model_folder(folder)[0].config
    model_config.n_embd = 40
    from gpt2zh.errors import UserError

    with pytest.raises(UserError, match="--dtype q8_0: quantizes in blocks of 32 values, but the model's n_embd is 40"):
        check_shapes(model_config, "q8_0")
    check_shapes(model_config, "f16")
