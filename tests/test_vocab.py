import json

import pytest
from conftest import CORPUS, ROOT, run

from gpt2zh.articles import encode_articles
from gpt2zh.text import clean_articles, read_novel, split_articles
from gpt2zh.vocab import SPECIAL_TOKENS, build_default_vocab, load_tokenizer, read_vocab


def test_committed_vocabulary_is_what_the_builder_makes(tmp_path):
    run("cache/make_vocab.py", "--output", tmp_path / "vocab.txt", cwd=ROOT)
    committed = (ROOT / "cache" / "vocab_small.txt").read_bytes()
    assert (tmp_path / "vocab.txt").read_bytes() == committed
    assert committed.count(b"\n") == 13317


def test_default_vocabulary_contents():
    tokens = build_default_vocab()
    assert tokens[:5] == SPECIAL_TOKENS and len(set(tokens)) == len(tokens) == 13317
    gb2312 = set()
    for lead in range(0xB0, 0xF8):
        for trail in range(0xA1, 0xFF):
            try:
                gb2312.add(bytes([lead, trail]).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    assert len(gb2312) == 6763 and gb2312 <= set(tokens)
    assert {"，", "。", "“", "”", "：", "？", "！", "a", "##a", "7", "##7"} <= set(tokens)


def test_tokenizer_reads_the_vocabulary_file():
    tokenizer = load_tokenizer(ROOT / "cache" / "vocab_small.txt")
    ids = encode_articles(tokenizer, ["孙悟空说：“hello！”\n第二行"])[0]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["[MASK]", "孙", "悟", "空", "说", "：", "“", "h", "##e", "##l", "##l", "##o", "！", "”",
                      "[SEP]", "第", "二", "行", "[CLS]"]


def test_corpus_vocabulary_mode(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(["龍鳳呈祥，龍飛鳳舞。"], ensure_ascii=False), encoding="utf-8")
    out = run("cache/make_vocab.py", "--from_json", tmp_path / "train.json", "--output", tmp_path / "v.txt",
              cwd=ROOT).stdout
    tokens = read_vocab(tmp_path / "v.txt")
    assert tokens[:5] == SPECIAL_TOKENS and {"龍", "鳳", "呈", "祥"} <= set(tokens)
    assert f'"vocab_size": {len(tokens)}' in out


@pytest.mark.skipif(not CORPUS.is_file(), reason="shared corpus not present")
def test_unk_rate_on_xiyouji_is_below_a_thousandth():
    text, _ = read_novel(CORPUS)
    articles, _, _ = clean_articles(split_articles(text))
    tokenizer = load_tokenizer(ROOT / "cache" / "vocab_small.txt")
    ids = [i for article in encode_articles(tokenizer, articles) for i in article]
    rate = ids.count(tokenizer.unk_token_id) / len(ids)
    print(f"[UNK] {100 * rate:.4f}% of {len(ids)} tokens")
    assert rate < 0.001
