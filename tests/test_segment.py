"""Word tokens (the original's --segment), with rjieba as the segmenter (an optional extra)."""
import json
import re

import pytest
from conftest import STORY, run, train_args

from gpt2zh.articles import TextStream, encode_articles, encode_prefix, ids_to_text

pytest.importorskip("rjieba", reason="the word segmenter is not installed (pip install rjieba)")


def word_tokenizer(tmp_path, min_count=2):
    from gpt2zh.vocab import build_word_vocab, is_segmented, load_tokenizer, write_vocab

    write_vocab(build_word_vocab([STORY * 3], min_count), tmp_path / "words.txt")
    tokenizer = load_tokenizer(tmp_path / "words.txt")
    assert is_segmented(tokenizer)
    return tokenizer


def test_text_to_words_and_back(tmp_path):
    tokenizer = word_tokenizer(tmp_path)
    article = "小明每天早上都到河边读书。\n白鹅游到岸边，叫了三声。麒麟"
    ids = encode_articles(tokenizer, [article])[0]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert {"小明", "每天", "白鹅"} <= set(tokens)  # words of the vocabulary
    assert "[UNK]" in tokens and tokens.count("[SEP]") == 1  # 麒 and 麟 are in no vocabulary: characters, [UNK]
    assert ids_to_text(tokenizer, ids) == article.replace("麒麟", "[UNK][UNK]")
    stream = TextStream(tokenizer, ids[:2])
    assert stream.text + "".join(stream.push(i) for i in ids[2:]) == ids_to_text(tokenizer, ids)
    assert tokenizer.convert_ids_to_tokens(encode_prefix(tokenizer, "[CLS]小明每天")) == ["[CLS]", "小明", "每天"]


def test_train_generate_eval_with_words(prepared):
    out = run("train.py", *train_args(**{"--tokenizer_path": None, "--epochs": 1, "--segment_min_count": 2}),
              "--segment", "--raw", cwd=prepared).stdout
    assert re.search(r"--segment: built a word vocabulary of [\d,]+ tokens \([\d,]+ words\)", out)
    sample = run("generate.py", "--device", "cpu", "--length", "20", "--nsamples", "1", "--prefix", "小明",
                 "--seed", "0", cwd=prepared).stdout
    assert "has a word vocabulary: the text is segmented into words" in sample
    assert re.findall(r"SAMPLE 1 =+\n\n(.*?)\n=+\n", sample, flags=re.S)[0].startswith("小明")
    run("generate.py", "--device", "cpu", "--length", "5", "--nsamples", "1", "--segment", cwd=prepared)
    (prepared / "data" / "eval.json").write_text(json.dumps([STORY], ensure_ascii=False), encoding="utf-8")
    run("eval.py", "--pretrained_model", "model/final_model", "--raw_data_path", "data/eval.json", "--raw",
        "--device", "cpu", "--num_pieces", "1", "--min_length", "10", "--segment", cwd=prepared)
    result = json.loads((prepared / "eval_result" / "result.json").read_text())
    assert result["tokens"] < result["characters"]


def test_segment_flags_that_contradict_the_vocabulary_are_refused(trained):
    for script, model_flag in (("generate.py", "--model_path"), ("eval.py", "--pretrained_model")):
        result = run(script, "--device", "cpu", model_flag, "model/final_model", "--segment", cwd=trained,
                     check=False)
        assert result.returncode == 2 and "was trained on characters (its vocabulary has no words); drop --segment" \
            in result.stderr, result.stderr
    result = run("train.py", *train_args(), "--segment", "--raw", "--output_dir", "other", cwd=trained, check=False)
    assert result.returncode == 2 and "has no words; drop it to build a word vocabulary" in result.stderr
