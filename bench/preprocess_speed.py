"""Preprocessing speed on 《西游记》: txt_to_json (read, detect, split), clr_ctrl (clean), tokenization.

Run from the project root: python bench/preprocess_speed.py [novel.txt]
Times the three steps in one process (library code, as the scripts call it) and the scripts end to end.
"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt2zh.fileio import write_json_atomic  # noqa: E402
from gpt2zh.pieces import build_pieces  # noqa: E402
from gpt2zh.text import clean_articles, read_novel, split_articles  # noqa: E402
from gpt2zh.vocab import load_tokenizer  # noqa: E402


def main():
    novel = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT.parent / "shared" / "corpus" / "xiyouji.txt")
    megabytes = novel.stat().st_size / 1e6
    vocab = ROOT / "cache" / "vocab_small.txt"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = load_tokenizer(vocab)  # imports transformers: timed separately below
        timings = {}
        start = time.perf_counter()
        text, _ = read_novel(novel)
        articles = split_articles(text)
        write_json_atomic(tmp / "input.json", articles)
        timings["txt_to_json (read, detect, split, write)"] = time.perf_counter() - start
        start = time.perf_counter()
        cleaned, _, _ = clean_articles(articles)
        write_json_atomic(tmp / "train.json", cleaned)
        timings["clr_ctrl (clean, write)"] = time.perf_counter() - start
        start = time.perf_counter()
        manifest = build_pieces(tmp / "train.json", tokenizer, vocab, tmp / "tokenized", 100, 128)
        timings["tokenize into 100 uint16 pieces (fast tokenizer)"] = time.perf_counter() - start
        print(f"{novel.name}: {megabytes:.2f} MB, {len(text):,} characters, {manifest['tokens']:,} tokens")
        for name, seconds in timings.items():
            print(f"  {name:<50} {seconds:6.3f} s  {megabytes / seconds:7.1f} MB/s")
        total = sum(timings.values())
        print(f"  {'all three steps':<50} {total:6.3f} s  {megabytes / total:7.1f} MB/s")

        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import transformers, torch"], check=True)
        imports = time.perf_counter() - start
        start = time.perf_counter()
        for script, *args in [("txt_to_json.py", str(novel), "--output", str(tmp / "i.json")),
                              ("clr_ctrl.py", "--input", str(tmp / "i.json"), "--output", str(tmp / "t.json"))]:
            subprocess.run([sys.executable, str(ROOT / script), *args], check=True, capture_output=True)
        scripts = time.perf_counter() - start
        print(f"  as commands: txt_to_json.py + clr_ctrl.py {scripts:.2f} s (Python start-up included); "
              f"train.py --raw adds the tokenization above after importing torch+transformers ({imports:.1f} s)")


if __name__ == "__main__":
    main()
