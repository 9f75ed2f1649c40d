"""Text that appears as it is sampled: generate.py with one sample in flight, and --interactive."""
import io
import re
import subprocess
import sys

from conftest import ROOT

from gpt2zh.articles import TextStream, ids_to_text
from gpt2zh.vocab import load_tokenizer


def test_text_stream_pieces_add_up_to_the_text():
    tokenizer = load_tokenizer(ROOT / "cache" / "vocab_small.txt")
    tokens = ["[CLS]", "悟", "空", "[SEP]", "he", "##llo", "world", "[SEP]", "[SEP]", "好", "[CLS]", "[MASK]", "你"]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    for start in range(len(ids)):
        stream = TextStream(tokenizer, ids[:start])
        text = stream.text + "".join(stream.push(i) for i in ids[start:])
        assert text == ids_to_text(tokenizer, ids)


def test_a_long_stream_decodes_a_window_and_still_adds_up(monkeypatch):
    """Past TextStream's window the pieces still add up to the whole text (line breaks, English words, runs of
    markers longer than the window), and each id costs the same decoding work: 2,000 ids about twice 1,000's."""
    import gpt2zh.articles as articles

    tokenizer = load_tokenizer(ROOT / "cache" / "vocab_small.txt")
    pattern = ["悟", "空", "[SEP]", "he", "##llo", "world", "。"] * 20 + ["[SEP]"] * 40 + ["[CLS]", "[MASK]", "好"] * 3
    ids = tokenizer.convert_tokens_to_ids(pattern)
    stream = TextStream(tokenizer)
    assert "".join(stream.push(i) for i in ids) == ids_to_text(tokenizer, ids)

    decoded = []
    real = articles.ids_to_text
    monkeypatch.setattr(articles, "ids_to_text",
                        lambda tokenizer, ids: decoded.append(len(ids)) or real(tokenizer, ids))
    work = {}
    for length in (1000, 2000):
        decoded.clear()
        stream = TextStream(tokenizer)
        for i in tokenizer.convert_tokens_to_ids(["天", "地", "，", "[SEP]"] * (length // 4)):
            stream.push(i)
        work[length] = sum(decoded)
    assert work[2000] <= 2.1 * work[1000], work


class Writes(io.StringIO):
    """stdout that remembers each write."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def test_one_sample_is_printed_token_by_token(trained, monkeypatch):
    import generate

    monkeypatch.chdir(trained)
    monkeypatch.setattr(sys, "argv", ["generate.py", "--device", "cpu", "--nsamples", "1", "--length", "25",
                                      "--prefix", "小明", "--seed", "2", "--save_samples",
                                      "--save_samples_path", "mnt"])
    out = Writes()
    monkeypatch.setattr(sys, "stdout", out)
    generate.main()
    monkeypatch.undo()
    pieces = [w for w in out.writes if w and re.search(r"[\u4e00-\u9fff，。]", w) and "SAMPLE" not in w]
    assert len(pieces) >= 15  # a write per sampled character (a [SEP] or [UNK]-free run may merge a few)
    saved = re.findall(r"SAMPLE 1 =+\n(.*)\n=+\n", (trained / "mnt" / "samples.txt").read_text(encoding="utf-8"),
                       flags=re.S)[0]
    assert saved.startswith("小明") and saved in out.getvalue()


def test_interactive_continues_each_beginning_until_an_empty_line(trained):
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--interactive", "--device", "cpu",
                             "--nsamples", "1", "--length", "10", "--seed", "1"], cwd=trained,
                            input="小明\n白鹅𠀀\n\n不读\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    samples = re.findall(r"SAMPLE \d+ =+\n\n(.*)\n", result.stdout)
    assert [s[:2] for s in samples] == ["小明", "白鹅"]  # the line after the empty one is never read
    assert "not in the vocabulary and become [UNK]: \U00020000" in result.stdout
    at_eof = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--interactive", "--device", "cpu",
                             "--nsamples", "2", "--length", "10"], cwd=trained, input="小明\n", capture_output=True,
                            text=True, timeout=120)
    assert at_eof.returncode == 0 and at_eof.stdout.count(" SAMPLE ") == 2 and "Traceback" not in at_eof.stderr
