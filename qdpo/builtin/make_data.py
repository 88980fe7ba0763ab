"""Generate the built-in preference pairs: `python -m qdpo.builtin.make_data [OUT_DIR]`.

Deterministic (fixed seed, fixed ordering, stdlib only): the shipped train.jsonl and
eval.jsonl are exactly what this writes. Every row is checked with
`follows_preference` before it is written: chosen must pass, rejected must fail.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from qdpo.builtin import HEDGES, follows_preference

SEED = 20250611
TRAIN_ROWS = 400
EVAL_ROWS = 48

# Short, crisp, and ASCII-only so a checker never trips over accents a model drops.
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Russia", "Moscow"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Poland", "Warsaw"),
    ("Sweden", "Stockholm"),
    ("Norway", "Oslo"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"),
    ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"),
    ("Switzerland", "Bern"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
    ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Venezuela", "Caracas"),
    ("Cuba", "Havana"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Afghanistan", "Kabul"),
    ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"),
    ("Morocco", "Rabat"),
    ("Ethiopia", "Addis Ababa"),
    ("Ghana", "Accra"),
    ("Uganda", "Kampala"),
    ("New Zealand", "Wellington"),
    ("Iceland", "Reykjavik"),
    ("Nepal", "Kathmandu"),
    ("Malaysia", "Kuala Lumpur"),
    ("Syria", "Damascus"),
    ("Lebanon", "Beirut"),
    ("Jordan", "Amman"),
    ("Qatar", "Doha"),
    ("Estonia", "Tallinn"),
    ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"),
    ("Jamaica", "Kingston"),
    ("Cambodia", "Phnom Penh"),
    ("Ecuador", "Quito"),
    ("Uruguay", "Montevideo"),
    ("Senegal", "Dakar"),
    ("Zimbabwe", "Harare"),
    ("Zambia", "Lusaka"),
    ("the United Kingdom", "London"),
    ("Kazakhstan", "Astana"),
)

# (word, opposite, a plausible wrong answer: usually a near-synonym of the word itself)
OPPOSITES: tuple[tuple[str, str, str], ...] = (
    ("hot", "cold", "warm"),
    ("big", "small", "huge"),
    ("fast", "slow", "quick"),
    ("happy", "sad", "glad"),
    ("light", "dark", "bright"),
    ("early", "late", "soon"),
    ("open", "closed", "wide"),
    ("full", "empty", "packed"),
    ("hard", "soft", "firm"),
    ("up", "down", "above"),
    ("strong", "weak", "tough"),
    ("rich", "poor", "wealthy"),
    ("young", "old", "new"),
    ("wet", "dry", "damp"),
    ("clean", "dirty", "neat"),
    ("loud", "quiet", "noisy"),
    ("thick", "thin", "wide"),
    ("push", "pull", "press"),
    ("buy", "sell", "pay"),
    ("win", "lose", "beat"),
    ("first", "last", "second"),
    ("day", "night", "noon"),
    ("north", "south", "east"),
    ("inside", "outside", "within"),
    ("love", "hate", "like"),
    ("true", "false", "real"),
    ("begin", "end", "start"),
    ("long", "short", "tall"),
    ("heavy", "light", "big"),
    ("near", "far", "close"),
    ("safe", "dangerous", "secure"),
    ("easy", "difficult", "simple"),
    ("give", "take", "send"),
    ("laugh", "cry", "smile"),
    ("asleep", "awake", "tired"),
    ("always", "never", "often"),
    ("cheap", "expensive", "low"),
    ("question", "answer", "query"),
    ("friend", "enemy", "pal"),
    ("sweet", "sour", "sugary"),
)

# (singular, plural, a plausible wrong plural)
PLURALS: tuple[tuple[str, str, str], ...] = (
    ("mouse", "mice", "mouses"),
    ("child", "children", "childs"),
    ("man", "men", "mans"),
    ("woman", "women", "womans"),
    ("foot", "feet", "foots"),
    ("tooth", "teeth", "tooths"),
    ("goose", "geese", "gooses"),
    ("box", "boxes", "boxs"),
    ("city", "cities", "citys"),
    ("baby", "babies", "babys"),
    ("leaf", "leaves", "leafs"),
    ("knife", "knives", "knifes"),
    ("wolf", "wolves", "wolfs"),
    ("potato", "potatoes", "potatos"),
    ("hero", "heroes", "heros"),
    ("bus", "buses", "buss"),
    ("dish", "dishes", "dishs"),
    ("church", "churches", "churchs"),
    ("fox", "foxes", "foxs"),
    ("story", "stories", "storys"),
    ("party", "parties", "partys"),
    ("half", "halves", "halfs"),
    ("life", "lives", "lifes"),
    ("wife", "wives", "wifes"),
    ("ox", "oxen", "oxes"),
    ("tomato", "tomatoes", "tomatos"),
    ("class", "classes", "classs"),
    ("watch", "watches", "watchs"),
    ("country", "countries", "countrys"),
    ("lady", "ladies", "ladys"),
    ("shelf", "shelves", "shelfs"),
    ("loaf", "loaves", "loafs"),
    ("brush", "brushes", "brushs"),
    ("glass", "glasses", "glasss"),
    ("thief", "thieves", "thiefs"),
    ("louse", "lice", "louses"),
)

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
EVAL_WEEKDAYS = ("Thursday", "Sunday")
EVAL_MONTHS = ("April", "August", "November")

# Rambling replies: half bury the answer in filler, half circle the topic and never give it.
# All run past MAX_WORDS and carry a hedge, so they fail the check twice over.
RAMBLING: tuple[str, ...] = (
    "That's a good question, and people ask it a lot. I think {fact}, but I'm "
    "honestly not completely certain, so it may be worth checking.",
    "Well, let me think about {topic} for a moment. There are a few ways to look "
    "at it, and it probably depends on how you count.",
    "Hmm, {topic} is something I've seen discussed. As far as I know, {fact}, though I could be mixing it up.",
    "Good question! {Topic} is one of those things that sounds simple. Different "
    "sources put it differently, so I would rather not commit to one answer.",
    "To answer that, we first need to think about what is really being asked. "
    "Generally speaking, {fact}, if I remember correctly, but please double-check.",
    "There is a lot one could say about {topic}. It really comes down to context "
    "and details, and I think it is best to keep an open mind.",
)

EVASIVE: tuple[str, ...] = (
    "I'm not able to say for sure.",
    "I'd rather not guess on that one.",
    "Sorry, I can't help with that.",
    "That's hard to say without more context.",
    "I don't know, you could look it up.",
    "It depends on who you ask.",
    "I'm not sure I can answer that.",
    "You may want to check another source.",
)

KINDS = ("wrong", "rambling", "evasive")


@dataclass(frozen=True)
class Family:
    """One kind of question: its phrasings, and how a reply names the topic and states a value."""

    name: str
    questions: tuple[str, ...]  # prompt templates over an entity's fields
    topic: str  # noun phrase used by replies that talk around the question
    fact: str  # sentence body stating value {v}; the chosen reply is this, capitalised
    quota: tuple[int, int]  # rows in (train, eval)


@dataclass(frozen=True)
class Entity:
    """One thing to ask about: template fields, the correct answer, and plausible wrong ones."""

    fields: dict[str, str]
    answer: str
    wrongs: tuple[str, ...]


@dataclass(frozen=True)
class Item:
    """One question ready to become a row."""

    family: Family
    entity: Entity
    prompt: str

    def fact(self, value: str) -> str:
        """The family's statement with `value` as the answer, lower-case and unpunctuated."""
        return self.family.fact.format(v=value, **self.entity.fields)

    def topic(self) -> str:
        """What the question is about, as a noun phrase."""
        return self.family.topic.format(**self.entity.fields)


FAMILIES: tuple[Family, ...] = (
    Family(
        "addition",
        ("What is {a} plus {b}?", "What is {a} + {b}?", "What do you get when you add {a} and {b}?"),
        "{a} plus {b}",
        "{a} plus {b} is {v}",
        (70, 6),
    ),
    Family(
        "multiplication",
        ("What is {a} times {b}?", "What is {a} multiplied by {b}?", "Multiply {a} by {b}."),
        "{a} times {b}",
        "{a} times {b} is {v}",
        (60, 6),
    ),
    Family(
        "capital",
        ("What is the capital of {c}?", "Name the capital of {c}.", "Which city is the capital of {c}?"),
        "the capital of {c}",
        "the capital of {c} is {v}",
        (60, 6),
    ),
    Family(
        "opposite",
        (
            "What is the opposite of {w}?",
            "Give the opposite of the word {w}.",
            "Which word means the opposite of {w}?",
        ),
        "the opposite of {w}",
        "the opposite of {w} is {v}",
        (50, 6),
    ),
    Family(
        "plural",
        ("What is the plural of {w}?", "Give the plural form of {w}.", "What is the plural of the word {w}?"),
        "the plural of {w}",
        "the plural of {w} is {v}",
        (50, 6),
    ),
    Family(
        "minutes",
        ("How many minutes are in {n} hours?", "How many minutes is {n} hours?", "Convert {n} hours to minutes."),
        "the number of minutes in {n} hours",
        "there are {v} minutes in {n} hours",
        (40, 5),
    ),
    Family(
        "weekday",
        (
            "What day comes after {d}?",
            "Which day of the week follows {d}?",
            "If today is {d}, what day is tomorrow?",
            "What is the day after {d}?",
        ),
        "the day after {d}",
        "the day after {d} is {v}",
        (20, 4),
    ),
    Family(
        "month",
        (
            "What month comes after {m}?",
            "Which month follows {m}?",
            "What is the month after {m}?",
            "If this month is {m}, what is next month?",
        ),
        "the month after {m}",
        "the month after {m} is {v}",
        (30, 5),
    ),
    Family(
        "days",
        ("How many days are in {n} weeks?", "How many days is {n} weeks?", "Convert {n} weeks to days."),
        "the number of days in {n} weeks",
        "there are {v} days in {n} weeks",
        (20, 4),
    ),
)


def _positive(values: list[int], answer: int) -> tuple[str, ...]:
    """Distinct positive wrong values, as strings, in a fixed order."""
    return tuple(str(v) for v in dict.fromkeys(values) if v > 0 and v != answer)


def _sums(lo: int, hi: int) -> list[Entity]:
    return [
        Entity({"a": str(a), "b": str(b)}, str(a + b), _positive([a + b + d for d in (-10, -2, -1, 1, 2, 10)], a + b))
        for a in range(lo, hi + 1)
        for b in range(lo, hi + 1)
    ]


def _products(pairs: list[tuple[int, int]]) -> list[Entity]:
    # Typical slips: one row too far or too short in the times table, or off by one.
    return [
        Entity(
            {"a": str(a), "b": str(b)},
            str(a * b),
            _positive([a * b - b, a * b + b, a * b - a, a * b + a, a * b + 1, a * b - 1], a * b),
        )
        for a, b in pairs
    ]


def _capitals(pairs: tuple[tuple[str, str], ...]) -> list[Entity]:
    # Wrong capitals come from the same split, so eval mentions no train country or city.
    cities = [city for _, city in pairs]
    return [Entity({"c": country}, city, tuple(c for c in cities if c != city)) for country, city in pairs]


def _words(triples: tuple[tuple[str, str, str], ...]) -> list[Entity]:
    return [Entity({"w": word}, right, (wrong,)) for word, right, wrong in triples]


def _cycle(names: tuple[str, ...], held_out: tuple[str, ...], key: str, want_eval: bool) -> list[Entity]:
    entities = []
    for i, name in enumerate(names):
        if (name in held_out) != want_eval:
            continue
        after = names[(i + 1) % len(names)]
        wrongs = (names[(i + 2) % len(names)], names[i - 1])  # two steps on, or the one before
        entities.append(Entity({key: name}, after, wrongs))
    return entities


def _times(ns: range, unit: int) -> list[Entity]:
    return [
        Entity(
            {"n": str(n)},
            str(n * unit),
            _positive([n * unit - unit, n * unit + unit, n * 100 if unit == 60 else n * 5, n * unit + 1], n * unit),
        )
        for n in ns
    ]


def entities(family: str, split: str) -> list[Entity]:
    """The entities of one family in one split; train and eval share none."""
    ev = split == "eval"
    if family == "addition":
        return _sums(41, 69) if ev else _sums(2, 39)
    if family == "multiplication":
        small = range(2, 10)
        if ev:  # one factor is 11 or 12: same skill, prompts never seen in training
            return _products([(a, b) for a in (11, 12) for b in small] + [(b, a) for a in (11, 12) for b in small])
        return _products([(a, b) for a in small for b in small])
    if family == "capital":
        # Every sixth country is held out: a fixed, spread-out choice.
        return _capitals(tuple(p for i, p in enumerate(CAPITALS) if (i % 6 == 5) == ev))
    if family == "opposite":
        return _words(tuple(t for i, t in enumerate(OPPOSITES) if (i % 5 == 4) == ev))
    if family == "plural":
        return _words(tuple(t for i, t in enumerate(PLURALS) if (i % 4 == 3) == ev))
    if family == "weekday":
        return _cycle(WEEKDAYS, EVAL_WEEKDAYS, "d", ev)
    if family == "month":
        return _cycle(MONTHS, EVAL_MONTHS, "m", ev)
    if family == "minutes":
        return _times(range(16, 25) if ev else range(2, 16), 60)
    if family == "days":
        return _times(range(11, 17) if ev else range(2, 11), 7)
    raise ValueError(f"unknown family {family!r}")


def pick_items(family: Family, split: str, rng: random.Random) -> list[Item]:
    """`quota` questions: every entity once before any entity twice, phrasings varied."""
    quota = family.quota[split == "eval"]
    pool = entities(family.name, split)
    rng.shuffle(pool)
    orders = [rng.sample(family.questions, len(family.questions)) for _ in pool]
    items = [
        Item(family, entity, order[r].format(**entity.fields))
        for r in range(len(family.questions))
        for entity, order in zip(pool, orders)
    ]
    assert len(items) >= quota, f"{family.name}/{split}: only {len(items)} distinct questions"
    return items[:quota]


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def rejected_reply(item: Item, kind: str, rng: random.Random) -> str:
    """A dispreferred reply of the given kind to `item`."""
    if kind == "wrong":
        return _capitalise(item.fact(rng.choice(item.entity.wrongs))) + "."
    if kind == "rambling":
        topic = item.topic()
        return rng.choice(RAMBLING).format(fact=item.fact(item.entity.answer), topic=topic, Topic=_capitalise(topic))
    return rng.choice(EVASIVE)


def build_split(split: str, rng: random.Random) -> list[dict]:
    """All rows of one split, shuffled, with rejected kinds in equal shares."""
    items = [item for family in FAMILIES for item in pick_items(family, split, rng)]
    rng.shuffle(items)
    rows = []
    for i, item in enumerate(items):
        chosen = _capitalise(item.fact(item.entity.answer)) + "."
        rejected = rejected_reply(item, KINDS[i % len(KINDS)], rng)
        rows.append(
            {
                "prompt": [{"role": "user", "content": item.prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "answer": item.entity.answer,
            }
        )
    return rows


def _check(rows: list[dict], expected: int) -> None:
    """Fail loudly if any row breaks the data set's promises."""
    assert len(rows) == expected, len(rows)
    prompts = [row["prompt"][0]["content"] for row in rows]
    assert len(set(prompts)) == len(prompts), "duplicate prompt"
    for row, prompt in zip(rows, prompts):
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert len(prompt.split()) <= 15, prompt
        assert len(chosen.split()) <= 12, chosen
        assert len(rejected.split()) <= 35, rejected
        assert follows_preference(chosen, row["answer"]), (prompt, chosen)
        assert not follows_preference(rejected, row["answer"]), (prompt, rejected)


def build() -> dict[str, list[dict]]:
    """Both splits, generated from the fixed seed and checked."""
    for template in RAMBLING + EVASIVE:
        assert any(h in template.lower() for h in HEDGES), f"no hedge phrase in {template!r}"
    rng = random.Random(SEED)
    splits = {"train": build_split("train", rng), "eval": build_split("eval", rng)}
    _check(splits["train"], TRAIN_ROWS)
    _check(splits["eval"], EVAL_ROWS)
    train_prompts = {row["prompt"][0]["content"] for row in splits["train"]}
    assert not any(row["prompt"][0]["content"] in train_prompts for row in splits["eval"]), "eval prompt seen in train"
    return splits


def write(out_dir: Path) -> list[Path]:
    """Write train.jsonl and eval.jsonl into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in build().items():
        path = out_dir / f"{split}.jsonl"
        # newline="\n" keeps the bytes identical on every platform.
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Regenerate the data set, by default next to this module."""
    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(args[0]) if args else Path(__file__).parent
    for path in write(out_dir):
        print(path)


if __name__ == "__main__":
    main()
