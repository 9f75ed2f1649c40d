"""Step 2: clean data/input.json into data/train.json (control/zero-width characters, whitespace). Like the
original's, it also repairs an input.json with raw control characters inside its strings."""
import argparse

from gpt2zh.errors import UserError, run_cli
from gpt2zh.fileio import write_json_atomic
from gpt2zh.text import clean_articles, load_articles


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", default="data/input.json", help="JSON list of articles written by txt_to_json.py")
    parser.add_argument("--output", default="data/train.json", help="where to write the cleaned JSON list")
    args = parser.parse_args()

    articles, repaired = load_articles(args.input, repair=True)
    if repaired:
        print(f"{args.input}: has raw control characters (line breaks, tabs, NUL, ...) inside its strings, which "
              f"JSON forbids; repaired (line breaks kept)")
    cleaned, removed, dropped = clean_articles(articles)
    if not cleaned:
        raise UserError(f"{args.input}: every one of its {len(articles)} articles is empty after cleaning; "
                        f"check that the novel's text made it into the file")
    write_json_atomic(args.output, cleaned)
    what = ", ".join(f"{count:,} {reason}" for reason, count in removed.most_common()) or "no characters"
    print(f"{args.input}: {len(articles)} articles; removed {what}; dropped {dropped} empty articles")
    print(f"wrote {len(cleaned)} articles ({sum(map(len, cleaned)):,} characters) -> {args.output}")


if __name__ == "__main__":
    run_cli(main)
