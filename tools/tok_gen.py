"""Deterministic generator of tokenizer test inputs: text mixing many scripts, combining marks,
emoji ZWJ sequences, whitespace runs of every kind, digit runs, contractions, special tokens written
inside the text, and (as bytes) invalid UTF-8. Used by tests/py/test_tok_parity.py.

    python tools/tok_gen.py --seed 1 --n 5     # print a few samples
"""
import argparse
import random
import unicodedata

RANGES = [  # (first, last) code points of scripts worth covering
    (0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xFF), (0x100, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF),
    (0x530, 0x58F), (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0x980, 0x9FF),
    (0xE00, 0xE7F), (0x10A0, 0x10FF), (0x1100, 0x11FF), (0x3040, 0x309F), (0x30A0, 0x30FF),
    (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x2000, 0x206F), (0x2100, 0x214F), (0x2190, 0x21FF),
    (0x2200, 0x22FF), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF), (0x1D400, 0x1D7FF),
    (0x20000, 0x2A6DF), (0x0300, 0x036F),
]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", "\v", "\f", "\u00a0", "\u3000",
              "\u2002", "\u2009", "\u200a", "\u0085", "\u2028", "\u2029", "\u180e", "\u200b",
              "\u202f", "\u205f", "\u1680", " \n", "\n ", "\t\t", " \r\n "]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Ll", "'RE", "'D",
                "\u2019s", "'x", "'"]
PUNCT = list("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "--", "\u201c", "\u201d", "\u2014",
                                                     "\u2026", "\u00bf", "\u3002", "\uff01"]
EMOJI = ["\U0001F600", "\U0001F44D\U0001F3FD", "\U0001F468\u200d\U0001F469\u200d\U0001F467",
         "\u2764\ufe0f", "\U0001F1EF\U0001F1F5", "\U0001F3F3\ufe0f\u200d\U0001F308", "\u00a9",
         "\U0001F9D1\u200d\U0001F4BB", "\u2603"]
WORDS = ["the", "The", "HELLO", "world", "tokenizer", "Hello", "don", "I", "a", "ab", "once",
         "upon", "time", "Lily", "naïve", "café", "Führer", "Äpfel", "straße", "İstanbul",
         "日本語", "中文", "한국어", "Привет", "مرحبا", "नमस्ते", "สวัสดี", "שלום", "ελληνικά"]
DECOMPOSED = ["e\u0301", "\uac00\u11a7", "\u1100\u1161\u11a7", "a\u0308", "\u1100\u1161\u11a8", "n\u0303", "A\u030a", "\u0915\u093c"]


def _assigned(cp):
    cat = unicodedata.category(chr(cp))
    return cat not in ("Cn", "Cs", "Co")


def random_char(rng):
    lo, hi = rng.choice(RANGES)
    for _ in range(10):
        cp = rng.randint(lo, hi)
        if _assigned(cp):
            return chr(cp)
    return "x"


def random_text(rng, specials):
    """One string of 0..~40 pieces."""
    parts = []
    for _ in range(rng.randint(0, 40) if rng.random() < 0.9 else rng.randint(40, 200)):
        r = rng.random()
        if r < 0.22:
            w = rng.choice(WORDS)
            parts.append(w.upper() if rng.random() < 0.1 else w)
        elif r < 0.37:
            parts.append(rng.choice(WHITESPACE) * rng.randint(1, 3))
        elif r < 0.45:
            parts.append(rng.choice(CONTRACTIONS))
        elif r < 0.53:
            parts.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12))))
        elif r < 0.62:
            parts.append(rng.choice(PUNCT) * rng.randint(1, 3))
        elif r < 0.70:
            parts.append(rng.choice(EMOJI))
        elif r < 0.74:
            parts.append(rng.choice(DECOMPOSED))
        elif r < 0.80 and specials:
            s = rng.choice(specials)
            if rng.random() < 0.2:  # a near miss
                s = s[: rng.randint(1, max(1, len(s) - 1))]
            parts.append(s)
        else:
            parts.append("".join(random_char(rng) for _ in range(rng.randint(1, 6))))
    return "".join(parts)


INVALID = [b"\x80", b"\xbf", b"\xc0\xaf", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf0\x9f\x98",
           b"\xf5\x80\x80\x80", b"\xff", b"\xfe", b"\xf4\x90\x80\x80", b"\xe0\x80\x80", b"\xc2"]


def random_bytes(rng, specials):
    """UTF-8 of random_text with invalid sequences spliced in at random places."""
    b = bytearray(random_text(rng, specials).encode("utf-8"))
    for _ in range(rng.randint(1, 4)):
        pos = rng.randint(0, len(b))
        ins = rng.choice(INVALID) if rng.random() < 0.7 else bytes([rng.randint(0x80, 0xFF)])
        b[pos:pos] = ins
    return bytes(b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n", type=int, default=5)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    for _ in range(a.n):
        print(repr(random_text(rng, ["<s>", "<|im_start|>"])))


if __name__ == "__main__":
    main()
