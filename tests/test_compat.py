"""What the original's scripts did, and data that must never be read wrongly."""
import json

import pytest
import torch
from conftest import ROOT, STORY, TINY_CONFIG, run, train_args

from gpt2zh.evaluation import eval_windows
from gpt2zh.text import decode_bytes

# Our own writing, in three other scripts.
TRADITIONAL = ("第一回 山中的小廟\n從前有一座山，山裡有一座小廟，廟裡住著一位老和尚。他每天早晨都會到溪邊挑水，"
               "然後回來讀經。有一天，來了一個迷路的孩子，說他找不到回家的路。\n")
JAPANESE = ("第一章 小さな駅\n昔々、山の中に小さな駅がありました。"
            "毎朝、おじいさんは駅のベンチに座って、列車が来るのを待っていました。\n")
KOREAN = ("제1장 작은 마을\n옛날 옛적에 산속에 작은 마을이 있었습니다. "
          "매일 아침 할아버지는 강가에 가서 물을 길어 왔습니다.\n")


def test_clr_ctrl_repairs_raw_control_characters_inside_strings(project):
    """The original's clr_ctrl.py existed for input.json files with unescaped control characters."""
    (project / "data" / "input.json").write_bytes(
        '["第一回\n悟空\r\n说：\t你好\x00。", "第二回\n八戒"]'.encode("utf-8"))
    out = run("clr_ctrl.py", cwd=project).stdout
    assert "raw control characters" in out and "repaired" in out
    assert json.loads((project / "data" / "train.json").read_text(encoding="utf-8")) == \
        ["第一回\n悟空\n说： 你好。", "第二回\n八戒"]
    (project / "data" / "input.json").write_bytes('["第一回\n悟空", "没有结尾'.encode("utf-8"))
    result = run("clr_ctrl.py", cwd=project, check=False)
    assert result.returncode == 2 and "malformed JSON at line 2, column" in result.stderr


def test_txt_to_json_reads_novels_only(project):
    tokenized = project / "data" / "tokenized"
    tokenized.mkdir()
    (tokenized / "manifest.json").write_text("{}")
    (tokenized / "notes.txt").write_text("第一回 不是小说\n" * 50, encoding="utf-8")
    (project / "data" / "cpu_preset").mkdir()
    (project / "data" / "cpu_preset" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n的\n",
                                                               encoding="utf-8")
    (project / "data" / "old").mkdir()
    (project / "data" / "old" / "tokenized_train_0.txt").write_text("101 2345 678 " * 100)
    out = run("txt_to_json.py", cwd=project).stdout
    for name, reason in (("tokenized/notes.txt", "beside tokenized pieces"), ("cpu_preset/vocab.txt", "a vocabulary"),
                         ("old/tokenized_train_0.txt", "tokenized pieces of the original GPT2-Chinese")):
        assert f"data/{name}: skipped ({reason}, not a novel)" in out
    assert "data/story.txt: utf-8" in out
    articles = json.loads((project / "data" / "input.json").read_text(encoding="utf-8"))
    assert articles[0].startswith("第一回 小河边的早晨")


@pytest.mark.parametrize("text,encoding,name", [(TRADITIONAL, "big5", "Big5 (traditional Chinese)"),
                                                (JAPANESE, "shift_jis", "Shift-JIS (Japanese)"),
                                                (KOREAN * 10, "euc_kr", "EUC-KR (Korean)")],
                         ids=["big5", "shift_jis", "euc_kr"])
def test_other_double_byte_encodings_are_not_taken_for_gbk(text, encoding, name):
    """Their bytes decode as GB18030 without an error, into other characters."""
    data = text.encode(encoding)
    assert data.decode("gb18030") != text
    assert decode_bytes(data, "novel.txt") == (text, name)
    for gbk_novel in (STORY, STORY * 6):  # short and long: still GBK
        assert decode_bytes(gbk_novel.encode("gbk"), "novel.txt") == (gbk_novel, "gb18030")


@pytest.mark.parametrize("stride", [1, 5, 31, 32])
def test_eval_scores_every_token_once_with_context(stride):
    """A stride equal to n_ctx used to leave the first token of every later window unscored."""
    scored = []
    for start, end, first in eval_windows(100, 32, stride):
        assert start < first <= end and end - start <= 32  # at least one token of context in the window
        scored += range(first, end)
    assert scored == list(range(1, 100))


def test_eval_refuses_pieces_of_another_models_vocabulary(trained, tmp_path):
    from foreign_folders import write_hugging_face_folder

    run("eval.py", "--pretrained_model", "model/final_model", "--raw_data_path", "data/eval.json", "--raw",
        "--device", "cpu", "--num_pieces", "1", "--min_length", "10", "--tokenized_data_path", tmp_path / "pieces",
        "--log_step", "1", cwd=trained)
    write_hugging_face_folder(tmp_path / "other")
    result = run("eval.py", "--pretrained_model", tmp_path / "other", "--raw_data_path", "data/eval.json",
                 "--device", "cpu", "--num_pieces", "1", "--min_length", "10", "--tokenized_data_path",
                 tmp_path / "pieces", cwd=trained, check=False)
    assert result.returncode == 2 and "stale: the vocabulary" in result.stderr and "add --raw" in result.stderr


def test_eval_log_step_prints_the_running_loss(trained, tmp_path):
    out = run("eval.py", "--pretrained_model", "model/final_model", "--raw_data_path", "data/eval.json", "--raw",
              "--device", "cpu", "--num_pieces", "1", "--min_length", "10", "--batch_size", "1", "--log_step", "2",
              "--tokenized_data_path", tmp_path / "pieces", cwd=trained).stdout
    assert "batch 2: " in out and "batch 1: " not in out
    result = run("eval.py", "--log_step", "0", cwd=trained, check=False)
    assert result.returncode == 2 and "--log_step 0: must be at least 1" in result.stderr


def test_flags_that_used_to_crash(prepared):
    result = run("train.py", *train_args(**{"--log_step": 0}), "--raw", cwd=prepared, check=False)
    assert result.returncode == 2 and "--log_step 0: must be at least 1" in result.stderr
    result = run("train.py", *train_args(**{"--tokenizer_path": "data"}), "--raw", cwd=prepared, check=False)
    assert result.returncode == 2 and "data: a folder with no vocabulary in it" in result.stderr
    out = run("train.py", *train_args(**{"--tokenizer_path": "cache", "--epochs": 1}), "--raw", cwd=prepared,
              check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_a_model_folder_is_a_vocabulary_too_and_adam_eps_is_the_originals(trained, tmp_path):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work, ignore=shutil.ignore_patterns("model"))
    shutil.copytree(trained / "model" / "final_model", work / "released")
    run("train.py", *train_args(**{"--tokenizer_path": "released", "--epochs": 1}), cwd=work)
    state = torch.load(work / "model" / "checkpoint" / "training_state.pt", weights_only=False)
    assert {group["eps"] for group in state["optimizer"]["param_groups"]} == {1e-6}


def test_sampling_stops_at_the_end_of_an_article():
    from gpt2zh.model import build_model, load_config
    from gpt2zh.sampling import cut_at_stop, make_logits_processors, sample

    torch.manual_seed(0)
    model = build_model(load_config(TINY_CONFIG)).eval()
    processors = make_logits_processors(1.0, 0, 0, 1.0, [])
    free = sample(model, [4, 100], 10, 2, processors, n_ctx=32, greedy=True)
    stop = free[0, 4].item()  # the 3rd token sampled
    first = free[0].tolist().index(stop, 2)  # where row 0 first produced it
    stopped = sample(model, [4, 100], 10, 2, processors, n_ctx=32, greedy=True, stop_id=stop)
    assert stopped.shape[1] < free.shape[1] and stopped.tolist() == free[:, :stopped.shape[1]].tolist()
    assert cut_at_stop(free[0].tolist(), 2, stop) == free[0, :first + 1].tolist()
    assert cut_at_stop([4, 100, 7, 8], 2, 5) == [4, 100, 7, 8]


def test_help_says_how_the_batch_is_shared():
    from train import parse_args

    assert parse_args([]).tokenizer_path is None  # resolved to cache/vocab_small.txt, or the pretrained model's
    help_text = " ".join(run("train.py", "--help", cwd=ROOT).stdout.split())
    assert "DataParallel (--device 0,1) splits it across the GPUs" in help_text and "--fp16_opt_level" in help_text
