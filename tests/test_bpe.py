"""BPE tokens (the original's --bpe_token): trained on the corpus with the tokenizers library, same article format."""
import json
import re

from conftest import ROOT, STORY, TINY_CONFIG, run, train_args

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
    # no metaspace and no special token left in the text ("[" alone is an ASCII character of the alphabet)
    assert text.startswith("小明") and "▁" not in text
    assert not any(special in text for special in ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")), text
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


def write_gpt2_bpe_files(folder, size=300):
    """encoder.json and vocab.bpe in GPT-2's format, of a byte-level BPE trained on our story: few merges, so
    some hanzi take several tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(STORY.split("\n"), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_json, merges = tokenizer.model.save(str(folder))
    (folder / "encoder.json").write_bytes(open(vocab_json, "rb").read())
    (folder / "vocab.bpe").write_bytes(open(merges, "rb").read())
    return folder / "encoder.json", folder / "vocab.bpe"


def test_gpt2_bpe_files_round_trip_and_stream_whole_characters(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from gpt2zh.vocab import is_byte_level, load_gpt2_bpe

    files = write_gpt2_bpe_files(tmp_path)
    tokenizer = for_gpt2(PreTrainedTokenizerFast(tokenizer_object=load_gpt2_bpe(*files), unk_token="[UNK]"))
    assert is_bpe(tokenizer) and is_byte_level(tokenizer) and len(tokenizer) == 300 + 5
    article = "小明每天早上都到河边读书。\n他说 Hello World，龍叫了三声。"  # 龍 and capitals: not in the story
    ids = encode_articles(tokenizer, [article])[0]
    assert tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == ["[MASK]", "[CLS]"]
    assert tokenizer.unk_token_id not in ids and ids_to_text(tokenizer, ids) == article
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some characters are split across tokens
    stream = TextStream(tokenizer, ids[:3])
    pieces = [stream.text] + [stream.push(i) for i in ids[3:]]
    assert "".join(pieces) == article and not any("\ufffd" in piece for piece in pieces)


def test_train_generate_eval_with_gpt2_bpe_files_at_the_originals_paths(prepared):
    write_gpt2_bpe_files(prepared / "tokenizations")
    config = json.loads(TINY_CONFIG.read_text())
    (prepared / "config" / "bpe.json").write_text(json.dumps({**config, "vocab_size": 305}))
    out = run("train.py", *train_args(**{"--tokenizer_path": None, "--epochs": 1, "--model_config": "config/bpe.json"}),
              "--bpe_token", "--raw", cwd=prepared).stdout
    assert "GPT-2's BPE files tokenizations/encoder.json and tokenizations/vocab.bpe (305 tokens" in out
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(prepared / "model" / "final_model")
    assert saved.decode(saved("小明读书\n")["input_ids"]) == "小明读书\n"
    sample = run("generate.py", "--device", "cpu", "--length", "30", "--nsamples", "1", "--prefix", "小明",
                 "--seed", "0", cwd=prepared).stdout
    text = re.findall(r"SAMPLE 1 =+\n\n(.*?)\n=+\n", sample, flags=re.S)[0]
    assert text.startswith("小明") and "Ġ" not in text and "[" not in text
    (prepared / "data" / "eval.json").write_text(json.dumps([STORY], ensure_ascii=False), encoding="utf-8")
    run("eval.py", "--pretrained_model", "model/final_model", "--raw_data_path", "data/eval.json", "--raw",
        "--device", "cpu", "--num_pieces", "1", "--min_length", "10", cwd=prepared)
    result = json.loads((prepared / "eval_result" / "result.json").read_text())
    assert result["tokens"] > result["characters"]  # bytes: a hanzi often takes more than one token


def test_gpt2_bpe_file_mistakes_are_explained(prepared):
    encoder, merges = write_gpt2_bpe_files(prepared / "gpt2")
    cases = [(["--bpe_token", "--encoder_json", "gpt2/missing.json", "--vocab_bpe", merges],
              "--encoder_json gpt2/missing.json: file not found"),
             (["--encoder_json", encoder, "--vocab_bpe", merges], "are read only with --bpe_token"),
             (["--bpe_token", "--encoder_json", merges, "--vocab_bpe", merges], "not GPT-2 BPE files"),
             (["--bpe_token", "--tokenizer_path", "cache/vocab_small.txt", "--encoder_json", encoder],
              "give one vocabulary")]
    for flags, message in cases:
        result = run("train.py", *train_args(**{"--tokenizer_path": None}), "--raw", *flags, cwd=prepared, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, flags


def test_a_saved_tokenizer_reads_every_kind_of_tokenizer_json_as_transformers_does(tmp_path):
    """Sampling reads a folder's tokenizer.json with the tokenizers library alone (generate.py starts without
    transformers): for a character vocabulary, a word vocabulary, our BPE and GPT-2's byte-level BPE, saved as train.py
    saves them, the same vocabulary, special ids and kind of vocabulary as transformers' tokenizer, the same ids of a
    prefix (markers, a line break, English, a character not in the vocabulary) and the same text of ids, whole and
    streamed."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from gpt2zh.articles import encode_prefix
    from gpt2zh.vocab import (
        SavedTokenizer,
        folder_tokenizer,
        is_byte_level,
        is_segmented,
        load_gpt2_bpe,
        load_tokenizer,
        read_vocab,
    )

    characters = ROOT / "cache" / "vocab_small.txt"

    words = tmp_path / "words.txt"
    words.write_text("".join(t + "\n" for t in [*read_vocab(characters), "小明", "河边", "读书"]), encoding="utf-8")
    tokenizers = {"characters": load_tokenizer(characters), "words": load_tokenizer(words),
                  "bpe": bpe(STORY.split("第二回")),
                  "gpt2 bpe": for_gpt2(PreTrainedTokenizerFast(tokenizer_object=load_gpt2_bpe(
                      *write_gpt2_bpe_files(tmp_path)), unk_token="[UNK]"))}
    prefix = "[CLS]小明每天早上都到河边读书。\n他说 Hello World，龍叫了三声。"
    for kind, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(tmp_path / kind)
        theirs, ours = folder_tokenizer(tmp_path / kind), folder_tokenizer(tmp_path / kind, sampling=True)
        assert isinstance(ours, SavedTokenizer), kind
        assert ours.get_vocab() == theirs.get_vocab() and len(ours) == len(theirs), kind
        assert (ours.unk_token_id, ours.pad_token_id) == (theirs.unk_token_id, theirs.pad_token_id), kind
        assert [f(ours) for f in (is_bpe, is_byte_level, is_segmented)] == \
               [f(theirs) for f in (is_bpe, is_byte_level, is_segmented)], kind
        for token in ("[SEP]", "no such token"):
            assert ours.convert_tokens_to_ids(token) == theirs.convert_tokens_to_ids(token), (kind, token)
        ids = encode_prefix(theirs, prefix)
        assert encode_prefix(ours, prefix) == ids and encode_prefix(ours, prefix, True) == encode_prefix(
            theirs, prefix, True), kind
        ids += torch.randint(0, len(ours), (40,), generator=torch.Generator().manual_seed(0)).tolist()
        assert ids_to_text(ours, ids) == ids_to_text(theirs, ids), kind
        stream = TextStream(ours, ids[:3])
        assert stream.text + "".join(stream.push(i) for i in ids[3:]) == ids_to_text(theirs, ids), kind
    assert is_segmented(tokenizers["words"]) and is_byte_level(tokenizers["gpt2 bpe"])
