"""Step 1: turn the novel(s) in data/ into data/input.json, a JSON list of articles (chapters)."""
import argparse

from gpt2zh.errors import UserError, run_cli
from gpt2zh.fileio import write_json_atomic
from gpt2zh.text import find_txt_files, read_novel, split_articles


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("paths", nargs="*", default=["data/"],
                        help=".txt files or folders to read (folders: every .txt inside, recursively); default data/")
    parser.add_argument("--output", default="data/input.json", help="where to write the JSON list of articles")
    parser.add_argument("--chunk_chars", type=int, default=3000,
                        help="for text without chapter headings: cut into paragraph-aligned chunks of about this many "
                             "characters")
    parser.add_argument("--eval_articles", type=int, default=0,
                        help="hold out the last N articles (e.g. 5 = chapters 96-100 of a 100-chapter novel) for "
                             "evaluation")
    parser.add_argument("--eval_output", default="data/eval_input.json", help="where the held-out articles go")
    args = parser.parse_args()
    if args.chunk_chars < 1:
        raise UserError(f"--chunk_chars {args.chunk_chars}: must be at least 1")
    if args.eval_articles < 0:
        raise UserError(f"--eval_articles {args.eval_articles}: must be 0 or more")

    articles, total_chars = [], 0
    for path in find_txt_files(args.paths):
        text, encoding = read_novel(path)
        found = split_articles(text, args.chunk_chars)
        print(f"{path}: {encoding}, {len(text):,} characters, {len(found)} articles")
        articles += found
        total_chars += len(text)

    held_out = []
    if args.eval_articles:
        if args.eval_articles >= len(articles):
            raise UserError(f"--eval_articles {args.eval_articles}: only {len(articles)} articles were found; "
                            f"hold out fewer so that some remain for training")
        articles, held_out = articles[:-args.eval_articles], articles[-args.eval_articles:]
        write_json_atomic(args.eval_output, held_out)
        print(f"held out the last {len(held_out)} articles -> {args.eval_output}")
    write_json_atomic(args.output, articles)
    print(f"wrote {len(articles)} articles ({sum(map(len, articles)):,} characters) -> {args.output}")


if __name__ == "__main__":
    run_cli(main)
