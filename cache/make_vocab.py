"""Build a vocabulary: the default cache/vocab_small.txt, one from the characters of a train.json, or (--bpe) a
BPE tokenizer trained on a train.json."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2zh.errors import UserError, run_cli  # noqa: E402
from gpt2zh.text import load_articles  # noqa: E402
from gpt2zh.vocab import (  # noqa: E402
    DEFAULT_VOCAB_SIZE,
    build_bpe,
    build_corpus_vocab,
    build_default_vocab,
    build_word_vocab,
    write_vocab,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="cache/vocab_small.txt", help="where to write the vocabulary")
    parser.add_argument("--size", type=int, default=DEFAULT_VOCAB_SIZE, help="size of the default vocabulary")
    parser.add_argument("--from_json", default=None,
                        help="build from the characters of this train.json instead (e.g. a novel in traditional "
                             "characters)")
    parser.add_argument("--min_count", type=int, default=1, help="with --from_json: keep characters seen this often")
    parser.add_argument("--segment", action="store_true",
                        help="with --from_json: a word vocabulary (every character, plus the words rjieba finds at "
                             "least --min_count times; --min_count 5 is what train.py --segment uses)")
    parser.add_argument("--bpe", action="store_true",
                        help="with --from_json: train a BPE tokenizer (a .json file for --tokenizer_path) instead")
    parser.add_argument("--bpe_vocab_size", type=int, default=8000, help="with --bpe: tokens of the BPE")
    args = parser.parse_args()
    if args.bpe:
        if not args.from_json or not args.output.endswith(".json"):
            raise UserError("--bpe: give --from_json data/train.json and an --output ending in .json, e.g. "
                            "--output cache/bpe_tokenizer.json")
        tokenizer = build_bpe(load_articles(args.from_json), args.bpe_vocab_size)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(args.output)
        print(f"wrote a BPE of {tokenizer.get_vocab_size()} tokens -> {args.output}")
        print(f'set "vocab_size": {tokenizer.get_vocab_size()} (or more) in your model config')
        return
    if args.segment:
        if not args.from_json:
            raise UserError("--segment: give --from_json data/train.json to find the words in")
        tokens = build_word_vocab(load_articles(args.from_json), args.min_count)
    elif args.from_json:
        tokens = build_corpus_vocab(load_articles(args.from_json), args.min_count)
    else:
        tokens = build_default_vocab(args.size)
    write_vocab(tokens, args.output)
    print(f"wrote {len(tokens)} tokens -> {args.output}")
    if args.from_json:
        print(f'set "vocab_size": {len(tokens)} (or more) in your model config')


if __name__ == "__main__":
    run_cli(main)
