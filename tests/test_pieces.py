import json

import numpy as np
import pytest
from conftest import ROOT

from gpt2zh.errors import UserError
from gpt2zh.pieces import (
    build_pieces,
    check_pieces,
    load_pieces,
    make_batch,
    make_windows,
    noise_inputs,
    shifted_windows,
    window_starts,
)
from gpt2zh.vocab import load_tokenizer

VOCAB = ROOT / "cache" / "vocab_small.txt"


def test_windows_cover_every_token():
    assert window_starts(10, 16, 4) == [0]  # shorter than n_ctx: trained on whole
    assert window_starts(16, 16, 4) == [0]
    assert window_starts(30, 16, 8) == [0, 8, 14]  # the leftover end gets its own window
    assert window_starts(32, 16, 8) == [0, 8, 16]
    for length in range(1, 60):
        covered = set()
        for start in window_starts(length, 16, 5):
            covered.update(range(start, min(start + 16, length)))
        assert covered == set(range(length))


def test_short_windows_are_padded_with_ignored_labels():
    pieces = [np.arange(5, 10, dtype=np.uint16), np.arange(20, 40, dtype=np.uint16)]
    windows = make_windows(pieces, n_ctx=8, stride=8)
    assert windows.tolist() == [[0, 0, 5], [1, 0, 8], [1, 8, 8], [1, 12, 8]]
    input_ids, labels = make_batch(pieces, windows[:2], pad_id=0)
    assert input_ids[0].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert labels[0].tolist() == [5, 6, 7, 8, 9, -100, -100, -100]


def test_shifted_windows_stay_in_their_pieces_and_reach_every_offset():
    pieces = [np.arange(5), np.arange(40)]
    windows = make_windows(pieces, n_ctx=8, stride=8)  # piece 1: starts 0, 8, 16, 24, 32
    lengths = np.array([len(piece) for piece in pieces])
    starts = set()
    for seed in range(200):
        shifted = shifted_windows(windows, lengths, 8, np.random.default_rng(seed))
        assert (shifted[:, [0, 2]] == windows[:, [0, 2]]).all()  # same pieces, same lengths, same number
        assert (windows[:, 1] <= shifted[:, 1]).all() and (shifted[:, 1] < windows[:, 1] + 8).all()
        assert (shifted[:, 1] + shifted[:, 2] <= lengths[shifted[:, 0]]).all()
        starts.update(map(tuple, shifted[:, :2].tolist()))
    assert starts == {(0, 0)} | {(1, start) for start in range(33)}  # the short piece stays whole


def test_each_epoch_shifts_the_windows_its_own_way_and_the_same_on_every_run():
    from types import SimpleNamespace

    from gpt2zh.training import epoch_windows

    pieces = [np.arange(3000)]
    data = SimpleNamespace(pieces=pieces, windows=make_windows(pieces, n_ctx=64, stride=64))
    args = SimpleNamespace(shift_windows=True, seed=1, stride=64)
    first, again, second = (epoch_windows(data, args, epoch) for epoch in (0, 0, 1))
    assert (first == again).all() and (first != second).any() and (first != data.windows).any()
    assert epoch_windows(data, SimpleNamespace(shift_windows=False), 0) is data.windows


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(["第一回\n甲乙丙丁。", "短", "第二回\n戊己庚辛。"], ensure_ascii=False),
                    encoding="utf-8")
    return path


def test_more_pieces_than_articles_and_min_length(corpus, tmp_path):
    tokenizer = load_tokenizer(VOCAB)
    manifest = build_pieces(corpus, tokenizer, VOCAB, tmp_path / "tok", num_pieces=5, min_length=2)
    pieces = load_pieces(str(tmp_path / "tok") + "/", manifest)  # a trailing slash is fine
    stream = np.concatenate(pieces).tolist()
    assert len(pieces) == 5 and manifest["articles"] == 2 and manifest["articles_skipped"] == 1
    assert tokenizer.convert_ids_to_tokens(stream[:5]) == ["[MASK]", "第", "一", "回", "[SEP]"]
    assert stream.count(tokenizer.convert_tokens_to_ids("[CLS]")) == 2
    assert pieces[0].dtype == np.uint16


def test_stale_pieces_say_what_changed(corpus, tmp_path):
    tokenizer = load_tokenizer(VOCAB)
    build_pieces(corpus, tokenizer, VOCAB, tmp_path / "tok", num_pieces=2, min_length=2)
    assert check_pieces(corpus, tokenizer, VOCAB, tmp_path / "tok", 2, 2)["num_pieces"] == 2
    with pytest.raises(UserError, match="--num_pieces changed.*add --raw"):
        check_pieces(corpus, tokenizer, VOCAB, tmp_path / "tok", 3, 2)
    other_vocab = tmp_path / "vocab.txt"
    other_vocab.write_text(VOCAB.read_text(encoding="utf-8") + "新\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"the vocabulary \(.*vocab.txt\) changed"):
        check_pieces(corpus, load_tokenizer(other_vocab), other_vocab, tmp_path / "tok", 2, 2)
    corpus.write_text(json.dumps(["第一回\n甲乙丙丁戊。"], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError, match="the corpus .*train.json changed"):
        check_pieces(corpus, tokenizer, VOCAB, tmp_path / "tok", 2, 2)
    with pytest.raises(UserError, match="no tokenized pieces; add --raw"):
        check_pieces(corpus, tokenizer, VOCAB, tmp_path / "elsewhere", 2, 2)


def test_every_article_too_short(corpus, tmp_path):
    with pytest.raises(UserError,
                       match=r"all 3 articles are shorter than --min_length 100 characters \(the longest has 9\)"):
        build_pieces(corpus, load_tokenizer(VOCAB), VOCAB, tmp_path / "tok", num_pieces=1, min_length=100)


def test_input_noise_replaces_a_share_of_the_inputs_from_the_unigram_distribution_and_never_the_labels():
    input_ids = np.tile(np.arange(100), (200, 1))  # [200, 100]
    labels = input_ids.copy()
    labels[:, 90:] = -100  # padding
    unigram = np.array([0.0, 0.25, 0.75])  # noise draws ids 1 and 2 only
    noisy = noise_inputs(input_ids.copy(), labels, 0.1, unigram, np.random.default_rng(0))
    changed = noisy != input_ids
    assert not changed[:, 90:].any() and (labels[:, :90] == input_ids[:, :90]).all()
    assert abs(changed[:, 3:90].mean() - 0.1) < 0.01  # ids 1 and 2 may be drawn as themselves
    drawn = noisy[:, 3:90][changed[:, 3:90]]
    assert set(np.unique(drawn)) <= {1, 2} and abs((drawn == 2).mean() - 0.75) < 0.03
    again = noise_inputs(input_ids.copy(), labels, 0.1, unigram, np.random.default_rng(0))
    assert (again == noisy).all()  # the same generator state draws the same noise
