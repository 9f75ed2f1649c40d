"""BPE tokens (the original's --bpe_token): trained on the corpus with the tokenizers library, same article format."""
import json
import re

from conftest import STORY, run, train_args
from gpt2zh.articles import TextStream, encode_articles, ids_to_text
from gpt2zh.vocab import build_bpe, for_gpt2, is_bpe


def bpe(articles, size=400):
    from transformers import PreTrainedTokenizerFast

    return for_gpt2(PreTrainedTokenizerFast(tokenizer_object=build_bpe(articles, size), unk_token="[UNK]"))


def test_text_to_bpe_tokens_and_back():
    """No spaces inserted between characters, spaces and line breaks kept, multi-character tokens learned."""
    tokenizer = bpe(STORY.split("第二回"))
    assert is_bpe(tokenizer)
    article = "小明每天早上都到河边读书。\n他说 hello world，白鹅叫了三声。"
    ids = encode_articles(tokenizer, [article])[0]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "[MASK]" and tokens[-1] == "[CLS]" and "[SEP]" in tokens
    assert any(len(t) > 1 and not t.startswith("[") for t in tokens)  # merges were learned
    assert tokenizer.unk_token_id not in ids  # ASCII is in the alphabet even where the corpus has none
    assert ids_to_text(tokenizer, ids) == article
    stream = TextStream(tokenizer, ids[:3])
    assert stream.text + "".join(stream.push(i) for i in ids[3:]) == article


def test_train_generate_eval_with_bpe_tokens(prepared):
    out = run("train.py", *train_args(**{"--tokenizer_path": None, "--epochs": 1}), "--bpe_token",
              "--bpe_vocab_size", "400", "--raw", cwd=prepared).stdout
    size = int(re.search(r"--bpe_token: built a BPE of (\d+) tokens", out).group(1))  # fewer: the story runs out
    assert (prepared / "data" / "tokenized" / "bpe_tokenizer.json").is_file()
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(prepared / "model" / "final_model")
    assert is_bpe(saved) and len(saved) == size
    sample = run("generate.py", "--device", "cpu", "--length", "30", "--nsamples", "1", "--prefix", "小明",
                 "--seed", "0", cwd=prepared).stdout
    text = re.findall(r"SAMPLE 1 =+\n\n(.*?)\n=+\n", sample, flags=re.S)[0]
    assert text.startswith("小明") and "▁" not in text and "[" not in text
    (prepared / "data" / "eval.json").write_text(json.dumps([STORY], ensure_ascii=False), encoding="utf-8")
    out = run("eval.py", "--pretrained_model", "model/final_model", "--raw_data_path", "data/eval.json", "--raw",
              "--device", "cpu", "--num_pieces", "1", "--min_length", "10", cwd=prepared).stdout
    result = json.loads((prepared / "eval_result" / "result.json").read_text())
    assert result["tokens"] < result["characters"]  # fewer tokens than characters: the per-character loss is lower
    assert result["loss_per_char"] < result["loss"] and "nats/character" in out


def test_bpe_token_refuses_a_character_vocabulary_and_make_vocab_writes_one(prepared):
    result = run("train.py", *train_args(), "--bpe_token", "--raw", cwd=prepared, check=False)
    assert result.returncode == 2 and "is not a BPE tokenizer" in result.stderr
    run("cache/make_vocab.py", "--bpe", "--from_json", "data/train.json", "--bpe_vocab_size", "400", "--output",
        "data/bpe.json", cwd=prepared)
    out = run("train.py", *train_args(**{"--tokenizer_path": "data/bpe.json", "--epochs": 1}), "--bpe_token", "--raw",
              cwd=prepared).stdout
    assert "saved model/final_model" in out
