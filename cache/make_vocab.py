"""Build a vocabulary: the default cache/vocab_small.txt, or one from the characters of a train.json."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2zh.errors import run_cli  # noqa: E402
from gpt2zh.text import load_articles  # noqa: E402
from gpt2zh.vocab import DEFAULT_VOCAB_SIZE, build_corpus_vocab, build_default_vocab, write_vocab  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="cache/vocab_small.txt", help="where to write the vocabulary")
    parser.add_argument("--size", type=int, default=DEFAULT_VOCAB_SIZE, help="size of the default vocabulary")
    parser.add_argument("--from_json", default=None,
                        help="build from the characters of this train.json instead (e.g. a novel in traditional characters)")
    parser.add_argument("--min_count", type=int, default=1, help="with --from_json: keep characters seen this often")
    args = parser.parse_args()
    if args.from_json:
        tokens = build_corpus_vocab(load_articles(args.from_json), args.min_count)
    else:
        tokens = build_default_vocab(args.size)
    write_vocab(tokens, args.output)
    print(f"wrote {len(tokens)} tokens -> {args.output}")
    if args.from_json:
        print(f'set "vocab_size": {len(tokens)} (or more) in your model config')


if __name__ == "__main__":
    run_cli(main)
