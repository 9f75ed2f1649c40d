from gpt2zh.quality import score, split_samples


def test_scores_a_readable_passage():
    text = "他走进山里。" * 4 + "天黑了！他问：“你是谁？”老人笑了。" * 3
    result = score(text)
    assert result["sentences"] == 4 + 3 * 3 and result["longest_hanzi_run"] == 1
    assert result["max_4gram_repeats"] == 1 and result["passes"]  # repeats of period 6 are not 4-gram loops
    assert result["longest_repeat"] == "他走进山里。×4"
    assert 0 < result["distinct_2"] < 1


def test_catches_stutter():
    stutter = "他点点点点头儿，坐坐坐坐坐坐罢。" + "好的。" * 12
    result = score(stutter)
    assert result["longest_hanzi_run"] == 6 and not result["passes"]
    looping = "一二三四一二三四一二三四" + "。" * 12
    assert score(looping)["max_4gram_repeats"] == 3 and not score(looping)["passes"]


def test_unk_share_and_sample_blocks():
    assert score("好[UNK]好")["unk_share"] == 1 / 3
    saved = ("=" * 40 + " SAMPLE 1 " + "=" * 40 + "\n甲。\n" + "=" * 90 + "\n\n"
             + "=" * 40 + " SAMPLE 2 " + "=" * 40 + "\n乙\n丙。\n" + "=" * 90 + "\n\n")
    assert split_samples(saved) == ["甲。", "乙\n丙。"]
