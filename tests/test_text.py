import json
import os

import pytest
from conftest import run

from gpt2zh.errors import UserError
from gpt2zh.text import clean_article, clean_articles, decode_bytes, load_articles, split_articles

TEXT = "第一章 开始\n他走进山里。\n第二章 后来\n他走出山外。"


@pytest.mark.parametrize("encoding,expected", [("utf-8", "utf-8"), ("utf-8-sig", "utf-8-sig"),
                                               ("utf-16", "utf-16"), ("utf-16-be", None), ("gbk", "gb18030"),
                                               ("gb18030", "gb18030")])
def test_decodes_common_encodings(encoding, expected):
    data = TEXT.encode(encoding)
    if encoding == "utf-16-be":
        data, expected = b"\xfe\xff" + data, "utf-16"
    text, used = decode_bytes(data, "novel.txt")
    assert text == TEXT and used == expected


def test_undecodable_and_binary_bytes_name_the_file():
    with pytest.raises(UserError, match="novel.txt.*neither UTF-8"):
        decode_bytes(b"\x81\x20\xff\xfe\x80", "novel.txt")
    with pytest.raises(UserError, match="novel.txt.*binary"):
        decode_bytes(b"abc\x00\x01\x02", "novel.txt")


def test_splits_at_chapter_headings_and_keeps_a_preface():
    articles = split_articles("序言在这里。\n第1回 一\n甲。\n第十二章：二\n乙。\n第三百回 三\n丙。")
    assert articles == ["序言在这里。", "第1回 一\n甲。", "第十二章：二\n乙。", "第三百回 三\n丙。"]


def test_a_sentence_starting_like_a_heading_is_not_one():
    text = ("第一回 开始\n"
            "第一回说的是一只猴子从石头里出来以后，在山上和别的猴子一起玩耍，玩了很多很多年，又去学了本事。")
    assert len(split_articles(text)) == 1


def test_text_without_headings_becomes_paragraph_aligned_chunks():
    paragraphs = ["这是第%d段，写得很长很长。" % i for i in range(100)]
    articles = split_articles("\n".join(paragraphs), chunk_chars=200)
    assert len(articles) > 5
    assert "\n".join(articles).split("\n") == paragraphs  # nothing lost, cuts only between paragraphs


def test_cleaning_removes_what_breaks_training_but_keeps_newlines():
    removed = __import__("collections").Counter()
    dirty = "\ufeff　　第一回\r\n他说\u200b：\x00“好\ufffd。”\x85\t\n\n\n\ud800下一段\x9f。  "
    assert clean_article(dirty, removed) == "第一回\n他说：“好。”\n下一段。"
    assert removed["C0 control"] == 1 and removed["C1 control"] == 1 and removed["lone surrogate"] == 1
    assert removed["zero-width or BOM"] == 2 and removed["U+FFFD replacement"] == 1


def test_articles_empty_after_cleaning_are_dropped():
    cleaned, _, dropped = clean_articles(["正文。", "\u200b\x00  \n"])
    assert cleaned == ["正文。"] and dropped == 1


def test_load_articles_reports_line_and_column(tmp_path):
    path = tmp_path / "input.json"
    path.write_text('[\n  "一",\n  "二" "三"\n]', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 3, column 7"):
        load_articles(path)
    path.write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(UserError, match="list of strings"):
        load_articles(path)
    path.write_text('["一", 2]', encoding="utf-8")
    with pytest.raises(UserError, match="item 1 is a int"):
        load_articles(path)


def test_txt_to_json_and_clr_ctrl_cli(project):
    (project / "data" / "gbk.txt").write_bytes("第一回 甲\n　　内容一。\r\n第二回 乙\r\n内容二。".encode("gbk"))
    out = run("txt_to_json.py", cwd=project).stdout
    assert "gbk.txt: gb18030" in out and "story.txt: utf-8" in out
    articles = json.loads((project / "data" / "input.json").read_text(encoding="utf-8"))
    assert "第一回 甲\n　　内容一。" in articles
    run("clr_ctrl.py", cwd=project)
    cleaned = json.loads((project / "data" / "train.json").read_text(encoding="utf-8"))
    assert "第一回 甲\n内容一。" in cleaned


def test_txt_to_json_holds_out_the_last_articles(project):
    out = run("txt_to_json.py", "--eval_articles", "2", cwd=project).stdout
    held_out = json.loads((project / "data" / "eval_input.json").read_text(encoding="utf-8"))
    kept = json.loads((project / "data" / "input.json").read_text(encoding="utf-8"))
    assert len(held_out) == 2 and held_out[-1].startswith("第二回") and "held out" in out
    assert len(kept) == 10


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "no .txt file found"),
    (lambda d: (d / "a.txt").write_text("  \n", encoding="utf-8"), "a.txt: is empty"),
    (lambda d: (d / "a.txt").write_bytes(b"\x7fELF\x00\x01\x02\x00"), "a.txt: contains NUL bytes"),
    (lambda d: (d / "a.txt").write_bytes("中文".encode("utf-8") + b"\xff\xff\x81"), "a.txt: is neither UTF-8"),
])
def test_txt_to_json_bad_input(tmp_path, setup, message):
    (tmp_path / "data").mkdir()
    setup(tmp_path / "data")
    result = run("txt_to_json.py", cwd=tmp_path, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "input.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_txt_to_json_unreadable_folder(tmp_path):
    locked = tmp_path / "data" / "locked"
    locked.mkdir(parents=True)
    locked.chmod(0)
    try:
        result = run("txt_to_json.py", cwd=tmp_path, check=False)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2 and "permission denied" in result.stderr


def test_unreadable_files_and_folders_even_as_root(tmp_path, monkeypatch):
    """Root reads everything, so the permission errors are simulated where they would be raised."""
    from gpt2zh import text

    path = tmp_path / "a.txt"
    path.write_text("内容", encoding="utf-8")

    def deny(self, *args):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(type(path), "read_bytes", deny)
    with pytest.raises(UserError, match="a.txt: permission denied"):
        text.read_novel(path)
    monkeypatch.setattr(type(path), "rglob", deny)
    with pytest.raises(UserError, match="permission denied while looking for .txt files"):
        text.find_txt_files([tmp_path])


@pytest.mark.parametrize("content,message", [
    ('["a",\n "b"', "line 2, column 5"),
    ('"just a string"', "JSON list of strings"),
    ('["\\u200b", "\\u0000 "]', "every one of its 2 articles is empty"),
])
def test_clr_ctrl_bad_input(tmp_path, content, message):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.json").write_text(content, encoding="utf-8")
    result = run("clr_ctrl.py", cwd=tmp_path, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "train.json").exists()
