"""Score generated samples (mnt/samples.txt) or 1000-character stretches of a real text for calibration."""
import argparse
import json
from pathlib import Path

from gpt2zh.errors import UserError, run_cli
from gpt2zh.quality import MAX_4GRAM_REPEATS, MAX_HANZI_RUN, MIN_SENTENCES, score, split_samples, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", nargs="?", default="mnt/samples.txt",
                        help="samples.txt from generate.py --save_samples")
    parser.add_argument("--reference", action="store_true",
                        help="score PATH as a plain text (e.g. the novel), cut into --stretch character pieces")
    parser.add_argument("--stretch", type=int, default=1000, help="characters per stretch with --reference")
    parser.add_argument("--json", default=None, help="also write the scores to this JSON file")
    args = parser.parse_args()
    path = Path(args.path)
    if not path.is_file():
        raise UserError(f"{path}: not found; write samples with generate.py --save_samples --save_samples_path mnt/")
    text = path.read_text(encoding="utf-8")
    if args.reference:
        flat = text.replace("\n", "")
        texts = [flat[i:i + args.stretch] for i in range(0, len(flat) - args.stretch + 1, args.stretch)]
    else:
        texts = split_samples(text)
    if not texts:
        raise UserError(f"{path}: no samples found (blocks start with '==== SAMPLE N ====')")
    scores = [score(t) for t in texts]
    if not args.reference:
        print(f"{'#':>3} {'chars':>6} {'sent.':>6} {'dist-1':>7} {'dist-2':>7} {'run':>4} {'4g×':>4}  pass  "
              f"longest repeat")
        for i, s in enumerate(scores, 1):
            print(f"{i:>3} {s['characters']:>6} {s['sentences']:>6} {s['distinct_1']:>7.3f} {s['distinct_2']:>7.3f} "
                  f"{s['longest_hanzi_run']:>4} {s['max_4gram_repeats']:>4}  {'yes' if s['passes'] else 'no ':>4}  "
                  f"{s['longest_repeat']}")
    total = summary(scores)
    print(f"{total['passing']}/{total['samples']} pass (>= {MIN_SENTENCES} sentences, no hanzi more than "
          f"{MAX_HANZI_RUN} times in a row, no 4-gram more than {MAX_4GRAM_REPEATS} times back to back); "
          f"mean distinct-2 {total['mean_distinct_2']:.3f}; median sentences {total['median_sentences']}; "
          f"[UNK] {100 * total['unk_share']:.3f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": total, "samples": scores}, ensure_ascii=False, indent=2),
                                   encoding="utf-8")


if __name__ == "__main__":
    run_cli(main)
