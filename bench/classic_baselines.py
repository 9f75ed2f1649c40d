"""Classic baselines for the held-out loss, in nats per character of the standard split (chapters 1-95 train,
96-100 held out, cleaned as the pipeline cleans them): interpolated Kneser-Ney character n-grams, and the
conditional compression of the held-out chapters given the training ones by xz (-9e) and bzip2 (-9).

Every character of the held-out articles is predicted, plus one end-of-article symbol per article (the
model's [CLS]), and the total is divided by the articles' characters, as eval.py's nats per character are.
Run from the project root: python bench/classic_baselines.py [xiyouji.txt]
"""
import argparse
import bz2
import lzma
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2zh.text import clean_articles, read_novel, split_articles  # noqa: E402

END = "\x00"  # the end of an article (a character no cleaned article contains)


def standard_split(novel, held_out=5):
    articles, _, _ = clean_articles(split_articles(read_novel(novel)[0]))
    return articles[:-held_out], articles[-held_out:]


class KneserNey:
    """Interpolated Kneser-Ney over characters, orders 1..n, discounts from count-of-counts (Ney et al.);
    the unigram level is interpolated with a uniform distribution over the training alphabet plus one unknown."""

    def __init__(self, text, order):
        self.order = order
        self.alphabet = len(set(text)) + 1
        self.counts = [Counter() for _ in range(order + 1)]  # counts[k][(history, char)], k = len(history) + 1
        for k in range(1, order + 1):
            for i in range(len(text) - k + 1):
                self.counts[k][text[i:i + k]] += 1
        # lower orders use continuation counts: the number of distinct characters seen before the n-gram
        for k in range(1, order):
            self.counts[k] = Counter(gram[1:] for gram in self.counts[k + 1])
        self.discount, self.context_total, self.context_types = [0.0], [None], [None]
        for k in range(1, order + 1):
            of = Counter(self.counts[k].values())
            self.discount.append(of[1] / (of[1] + 2 * of[2]) if of[1] else 0.5)
            total, types = defaultdict(int), defaultdict(int)
            for gram, count in self.counts[k].items():
                total[gram[:-1]] += count
                types[gram[:-1]] += 1
            self.context_total.append(total)
            self.context_types.append(types)

    def probability(self, history, char):
        p = 1 / self.alphabet
        for k in range(1, self.order + 1):  # from the unigram level up
            context = history[len(history) - (k - 1):] if k > 1 else ""
            if k > 1 and len(history) < k - 1:
                break
            total = self.context_total[k].get(context, 0)
            if total == 0:
                break  # unseen history: the lower orders' estimate stands
            discount = self.discount[k]
            p = (max(self.counts[k].get(context + char, 0) - discount, 0)
                 + discount * self.context_types[k][context] * p) / total
        return p

    def nats(self, text, start):
        """Negative log-likelihood of text[start:] given what precedes it."""
        return -sum(math.log(self.probability(text[max(0, i - self.order + 1):i], text[i]))
                    for i in range(start, len(text)))


def compressed_nats(compress, train, held_out):
    """Bytes the compressor spends on held_out after train, as nats."""
    base = len(compress(train.encode("utf-8")))
    return (len(compress((train + held_out).encode("utf-8"))) - base) * 8 * math.log(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("novel", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpus" /
                                                          "xiyouji.txt"))
    parser.add_argument("--orders", type=int, nargs="+", default=[2, 3, 4, 5])
    args = parser.parse_args()
    train_articles, held_articles = standard_split(args.novel)
    train = "".join(a + END for a in train_articles)
    held_out = "".join(a + END for a in held_articles)
    characters = sum(map(len, held_articles))
    print(f"{args.novel}: {len(train_articles)} training articles ({len(train):,} characters), "
          f"{len(held_articles)} held out ({characters:,} characters)")
    print(f"{'baseline':<34}{'nats/char':>10}{'seconds':>9}")
    for order in args.orders:
        start = time.time()
        model = KneserNey(train, order)
        nats = model.nats(train + held_out, len(train))
        print(f"{f'Kneser-Ney character {order}-gram':<34}{nats / characters:>10.3f}{time.time() - start:>9.1f}")
    for name, compress in (("xz -9e (conditional)", lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME)),
                           ("bzip2 -9 (conditional)", lambda b: bz2.compress(b, 9))):
        start = time.time()
        print(f"{name:<34}{compressed_nats(compress, train, held_out) / characters:>10.3f}{time.time() - start:>9.1f}")


if __name__ == "__main__":
    main()
