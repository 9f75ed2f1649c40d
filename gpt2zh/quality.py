"""Scores of generated text: sentences, diversity, stutter, [UNK] (issue: samples that keep writing)."""
import re
import statistics

SENTENCE_END = re.compile(r"[。！？]+[”’」』）]*")
HANZI = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")

# A sample passes when it reads like the novel does: every 1000-character stretch of 《西游记》
# has >= 10 sentences, no hanzi four times in a row, and no 4-gram three times back to back.
MIN_SENTENCES = 10
MAX_HANZI_RUN = 3
MAX_4GRAM_REPEATS = 2


def distinct(chars, n):
    grams = [tuple(chars[i:i + n]) for i in range(len(chars) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def longest_hanzi_run(text):
    best, run, previous = 0, 0, None
    for ch in text:
        run = run + 1 if ch == previous and HANZI.match(ch) else (1 if HANZI.match(ch) else 0)
        previous = ch
        best = max(best, run)
    return best


def max_repeats(chars, n):
    """The most times any n-gram occurs back to back (1 if none repeats)."""
    best = 1
    for start in range(len(chars) - 2 * n + 1):
        count = 1
        while chars[start + count * n:start + (count + 1) * n] == chars[start:start + n]:
            count += 1
        best = max(best, count)
    return best


def longest_repeated_ngram(chars, max_n=12):
    """The back-to-back repeat covering the most characters: (n-gram text, times), n >= 2."""
    best = ("", 1)
    for n in range(2, max_n + 1):
        for start in range(len(chars) - 2 * n + 1):
            count = 1
            while chars[start + count * n:start + (count + 1) * n] == chars[start:start + n]:
                count += 1
            if count > 1 and count * n > len(best[0]) * best[1]:
                best = ("".join(chars[start:start + n]), count)
    return best


def score(text):
    unk = text.count("[UNK]")
    chars = [c for c in text.replace("[UNK]", "\ufffd") if not c.isspace()]
    repeated, times = longest_repeated_ngram(chars)
    result = {"characters": len(chars), "sentences": len(SENTENCE_END.findall(text)),
              "distinct_1": distinct(chars, 1), "distinct_2": distinct(chars, 2),
              "longest_hanzi_run": longest_hanzi_run(text), "max_4gram_repeats": max_repeats(chars, 4),
              "longest_repeat": f"{repeated}×{times}" if repeated else "", "unk_share": unk / max(len(chars), 1)}
    result["passes"] = (result["sentences"] >= MIN_SENTENCES and result["longest_hanzi_run"] <= MAX_HANZI_RUN
                        and result["max_4gram_repeats"] <= MAX_4GRAM_REPEATS)
    return result


def summary(scores):
    return {"samples": len(scores), "passing": sum(s["passes"] for s in scores),
            "mean_distinct_2": statistics.mean(s["distinct_2"] for s in scores),
            "median_sentences": statistics.median(s["sentences"] for s in scores),
            "unk_share": statistics.mean(s["unk_share"] for s in scores)}


def split_samples(text):
    """The sample texts of a samples.txt written by generate.py."""
    blocks = re.split(r"^=+ SAMPLE \d+ =+\n", text, flags=re.M)[1:]
    return [re.sub(r"\n=+\n*$", "", block.rstrip("\n")).strip() for block in blocks]
