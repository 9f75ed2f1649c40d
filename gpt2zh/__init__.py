"""Train a Chinese GPT-2 from zero on a novel and continue it (a modern GPT2-Chinese)."""
