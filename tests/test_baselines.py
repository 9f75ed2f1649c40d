import sys

import pytest
from conftest import CORPUS, ROOT

sys.path.insert(0, str(ROOT / "bench"))
from classic_baselines import KneserNey, compressed_nats, standard_split  # noqa: E402


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_kneser_ney_is_a_distribution_for_every_history(order):
    text = "山高水长，山外有山。水长山高，高山流水。\x00"
    model = KneserNey(text, order)
    alphabet = sorted(set(text))
    for history in ["", "山", "山高", "高山流", "没见过", "水长山"]:
        total = sum(model.probability(history, c) for c in alphabet) + model.probability(history, "龙")
        assert total == pytest.approx(1.0, abs=1e-9), history
    assert model.probability("山", "高") > model.probability("山", "流")


def test_compression_baseline_charges_only_the_held_out_text():
    import lzma

    repeated = compressed_nats(lzma.compress, "山高水长。" * 200, "山高水长。" * 10)
    fresh = compressed_nats(lzma.compress, "山高水长。" * 200, "日月星辰风云雷电雨雪。")
    assert 0 <= repeated < fresh


@pytest.mark.skipif(not CORPUS.is_file(), reason="shared corpus not present")
def test_standard_split_is_chapters_1_to_95_and_96_to_100():
    train, held_out = standard_split(CORPUS)
    assert len(train) == 95 and len(held_out) == 5 and held_out[0].startswith("第九十六回")
