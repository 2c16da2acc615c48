"""The built-in demo dataset: arithmetic word problems with worked answers (offline, deterministic).

``DataConfig(dataset=None)`` trains on ``make_arithmetic_examples(n_builtin, seed=0)``: records with the
GSM8K columns, ``question`` and ``answer`` (the worked answer ends in ``#### <number>``).
"""

from __future__ import annotations

import random


NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Milo", "Nora"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards", "cookies", "stamps"]


def _problem(rng: random.Random) -> dict:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b, c = rng.randint(5, 60), rng.randint(2, 40), rng.randint(1, 20)
        c = min(c, a + b)
        q = f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to {other}. How many {item} does {name} have now?"
        s1, s2 = a + b, a + b - c
        ans = f"{name} starts with {a} {item}. After buying {b} more: {a} + {b} = {s1}. After giving {c} away: {s1} - {c} = {s2}.\n#### {s2}"
    elif kind == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 15)
        q = f"{name} packs {a} boxes with {b} {item} in each box. How many {item} are packed in total?"
        ans = f"Each box holds {b} {item} and there are {a} boxes: {a} * {b} = {a * b}.\n#### {a * b}"
    elif kind == 2:
        per, groups = rng.randint(2, 12), rng.randint(2, 10)
        total = per * groups
        q = f"{name} shares {total} {item} equally among {groups} friends. How many {item} does each friend get?"
        ans = f"{total} {item} shared among {groups} friends: {total} / {groups} = {per}.\n#### {per}"
    else:
        a, b, c = rng.randint(2, 9), rng.randint(3, 20), rng.randint(1, 30)
        q = f"{name} buys {a} bags of {item} with {b} {item} in each bag, and already had {c}. How many {item} does {name} have?"
        s1 = a * b
        ans = f"The bags hold {a} * {b} = {s1} {item}. Adding the {c} from before: {s1} + {c} = {s1 + c}.\n#### {s1 + c}"
    return {"question": q, "answer": ans}


def make_arithmetic_examples(n: int = 400, seed: int = 0) -> list[dict]:
    """``n`` deterministic arithmetic word problems with worked answers ending in ``#### <number>``."""
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]
