"""Dialogue scripts: who says what, before any timing. Built-in generators or a user's JSONL file.

Built-in topics, chained into one conversation (greeting, a few exchanges, goodbye):
- `qa`: spoken questions and answers over a small facts table; each fact belongs to one split, so test dialogues
  ask about facts never seen in training;
- `arithmetic`: "what is seven plus five?" with the answer spelled out;
- `smalltalk`: greetings, how-are-yous, weather, weekend plans, goodbyes;
- `instructions`: short how-to answers and requests ("count to five", "spell cat").

A JSONL file holds one dialogue per line: `{"turns": [{"speaker": "user", "text": "..."}, ...]}`, speaker
`moshi`/`SPEAKER_MAIN` or `user`; an optional `"split"` (train/valid/test) pins the dialogue to a split.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import ConfigError

MOSHI, USER = "moshi", "user"


@dataclass
class Turn:
    speaker: str  # MOSHI or USER
    text: str


@dataclass
class Dialogue:
    turns: list[Turn]
    topics: list[str] = field(default_factory=list)
    split: str | None = None  # a split pinned by the source (user JSONL), else chosen by the pipeline


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """Spell out 0 <= n < 1000 ("one hundred and twenty-one")."""
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


# (question, answer) facts; each fact's split comes from a hash of its question, so it never changes.
FACTS: list[tuple[str, str]] = [
    *[(f"What is the capital of {c}?", f"The capital of {c} is {k}.") for c, k in [
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
        ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
        ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
        ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Cuba", "Havana"), ("Chile", "Santiago"),
        ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"), ("Thailand", "Bangkok"),
        ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Finland", "Helsinki"),
        ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Turkey", "Ankara"),
        ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Morocco", "Rabat"), ("Vietnam", "Hanoi")]],
    *[(f"How many legs does {a} have?", f"{a.capitalize()} has {n} legs.") for a, n in [
        ("a spider", "eight"), ("a dog", "four"), ("a bird", "two"), ("an ant", "six"), ("a horse", "four"),
        ("a chicken", "two"), ("a beetle", "six"), ("an octopus", "eight arms, not"), ("a cat", "four"),
        ("a crab", "ten")]],
    *[(f"What color is {t}?", f"{t.capitalize()} is usually {c}.") for t, c in [
        ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"), ("coal", "black"),
        ("a tomato", "red"), ("an orange", "orange"), ("a lemon", "yellow"), ("chocolate", "brown")]],
    ("How many days are there in a week?", "There are seven days in a week."),
    ("How many months are there in a year?", "There are twelve months in a year."),
    ("How many minutes are there in an hour?", "There are sixty minutes in an hour."),
    ("What is the largest planet?", "The largest planet is Jupiter."),
    ("What planet do we live on?", "We live on the Earth."),
    ("What is the closest star to the Earth?", "The closest star is the Sun."),
    ("What do bees make?", "Bees make honey."),
    ("What do cows drink?", "Cows drink water, not milk."),
    ("Which animal is the tallest?", "The giraffe is the tallest animal."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("At what temperature does water boil?", "Water boils at one hundred degrees Celsius."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("How many continents are there?", "There are seven continents."),
]


def fact_split(question: str, fractions: dict[str, float]) -> str:
    """The split a fact belongs to: a stable hash of its question against the split fractions."""
    u = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if u < fractions["test"]:
        return "test"
    if u < fractions["test"] + fractions["valid"]:
        return "valid"
    return "train"


def facts_for(split: str, fractions: dict[str, float]) -> list[tuple[str, str]]:
    chosen = [f for f in FACTS if fact_split(f[0], fractions) == split]
    return chosen or [f for f in FACTS if fact_split(f[0], fractions) == "train"]


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


_ACKS = ["Oh, okay.", "I see.", "Thanks!", "Interesting.", "Right, that makes sense.", "Cool, thank you.",
         "Got it.", "Oh really?", "Nice."]
_ASK_PREFIX = ["", "", "Okay, ", "So, ", "Tell me, ", "Hey, ", "Quick question, "]


def topic_qa(rng: np.random.Generator, split: str, fractions: dict[str, float]) -> list[Turn]:
    question, answer = _pick(rng, facts_for(split, fractions))
    turns = [Turn(USER, _pick(rng, _ASK_PREFIX) + question[0].lower() + question[1:]
                  if rng.random() < 0.4 else question),
             Turn(MOSHI, answer + _pick(rng, ["", "", " Anything else you want to know?", " Good question."]))]
    if rng.random() < 0.5:
        turns.append(Turn(USER, _pick(rng, _ACKS)))
    return turns


def topic_arithmetic(rng: np.random.Generator, split: str, fractions: dict[str, float]) -> list[Turn]:
    op = _pick(rng, ["plus", "minus", "times"])
    a, b = int(rng.integers(0, 13)), int(rng.integers(0, 13))
    if op == "minus" and b > a:
        a, b = b, a
    result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    q = _pick(rng, ["What is {a} {op} {b}?", "Can you tell me what {a} {op} {b} is?", "How much is {a} {op} {b}?"])
    question = q.format(a=number_words(a), op=op, b=number_words(b))
    answer = _pick(rng, ["{a} {op} {b} is {r}.", "That is {r}.", "It's {r}.", "Let me see, {a} {op} {b} makes {r}."])
    turns = [Turn(USER, question),
             Turn(MOSHI, answer.format(a=number_words(a), op=op, b=number_words(b), r=number_words(result))
                  .capitalize())]
    if rng.random() < 0.4:
        turns.append(Turn(USER, _pick(rng, _ACKS)))
    return turns


_WEATHER = ["sunny", "rainy", "cloudy", "windy", "cold", "warm", "foggy"]
_PLANS = ["going hiking with friends", "reading a good book", "visiting my family", "cooking a big dinner",
          "watching a movie", "going to the beach", "working in the garden", "learning to play the guitar"]


def topic_smalltalk(rng: np.random.Generator, split: str, fractions: dict[str, float]) -> list[Turn]:
    kind = int(rng.integers(3))
    if kind == 0:
        w = _pick(rng, _WEATHER)
        return [Turn(USER, f"It is really {w} today, isn't it?"),
                Turn(MOSHI, _pick(rng, [f"Yes, it is quite {w}. How do you feel about that?",
                                        f"It does sound {w} where you are. I hope you are staying comfortable."])),
                Turn(USER, _pick(rng, ["I don't mind it at all.", "I wish it was different, honestly.",
                                       "It's fine, I guess."]))]
    if kind == 1:
        plan = _pick(rng, _PLANS)
        return [Turn(MOSHI, "Do you have any plans for the weekend?"),
                Turn(USER, f"I think I'm {plan}."),
                Turn(MOSHI, _pick(rng, ["That sounds lovely, I hope you enjoy it.", "Oh, that sounds like fun.",
                                        "Nice, that is a great way to relax."]))]
    return [Turn(USER, _pick(rng, ["What is your name?", "Who are you?", "Can you tell me about yourself?"])),
            Turn(MOSHI, _pick(rng, ["I'm Moshi, a voice assistant. I like talking with people.",
                                    "My name is Moshi. I can answer questions and chat with you."]))]


_INSTRUCTIONS = [
    ("How do I make a cup of tea?", ("First, boil some water. Then put a tea bag in a cup, pour the water, and wait "
                                    "three minutes. Finally, take out the bag and add milk if you like.")),
    ("How do I plant a seed?", ("Fill a pot with soil, press the seed a little into it, and water it gently. Keep it "
                               "in a sunny place and water it every few days.")),
    ("How can I fall asleep faster?", ("Try to go to bed at the same time every day. Avoid screens for an hour "
                                      "before bed, and keep your room dark and cool.")),
    ("How do I boil an egg?", ("Put the egg in a pot of cold water and bring it to a boil. Then let it cook for "
                              "about eight minutes and cool it in cold water.")),
    ("Can you count to five?", "Sure. One, two, three, four, five."),
    ("Can you count to ten?", "Of course. One, two, three, four, five, six, seven, eight, nine, ten."),
    ("How do you spell cat?", "Cat is spelled C, A, T."),
    ("How do you spell dog?", "Dog is spelled D, O, G."),
    ("Give me a tip to stay focused.", ("Work for twenty-five minutes, then take a short break. Put your phone in "
                                       "another room while you work.")),
]


def topic_instructions(rng: np.random.Generator, split: str, fractions: dict[str, float]) -> list[Turn]:
    ask, answer = _pick(rng, _INSTRUCTIONS)
    turns = [Turn(USER, ask), Turn(MOSHI, answer)]
    if rng.random() < 0.5:
        turns.append(Turn(USER, _pick(rng, _ACKS)))
    return turns


TOPICS: dict[str, Callable[[np.random.Generator, str, dict[str, float]], list[Turn]]] = {
    "qa": topic_qa, "arithmetic": topic_arithmetic, "smalltalk": topic_smalltalk,
    "instructions": topic_instructions}

_HELLOS = [(MOSHI, "Hello, how can I help you today?"), (MOSHI, "Hi there! What's on your mind?"),
           (USER, "Hello!"), (USER, "Hi Moshi, how are you?"), (USER, "Hey, good morning.")]
_HELLO_REPLIES = {"Hello!": "Hello! What can I do for you?", "Hi Moshi, how are you?": "I'm doing well, thanks "
                  "for asking. And you?", "Hey, good morning.": "Good morning! How can I help?"}
_BYES = [("Okay, thank you. Bye!", "You're welcome, goodbye!"), ("That's all for now, see you.",
         "See you later, have a nice day."), ("Thanks, bye bye.", "Bye, take care!")]


def generate_dialogue(rng: np.random.Generator, split: str, topics: list[str], fractions: dict[str, float],
                      exchanges: tuple[int, int] = (2, 5)) -> Dialogue:
    """A conversation: a greeting, `exchanges` topic exchanges drawn from `topics`, and a goodbye."""
    speaker, text = _pick(rng, _HELLOS)
    turns = [Turn(speaker, text)]
    if speaker == USER:
        turns.append(Turn(MOSHI, _HELLO_REPLIES[text]))
        if text.endswith("And you?") or turns[-1].text.endswith("And you?"):
            turns.append(Turn(USER, "I'm fine, thanks."))
    chosen = []
    for _ in range(int(rng.integers(exchanges[0], exchanges[1] + 1))):
        topic = _pick(rng, topics)
        chosen.append(topic)
        turns += TOPICS[topic](rng, split, fractions)
    if rng.random() < 0.8:
        bye, reply = _pick(rng, _BYES)
        turns += [Turn(USER, bye), Turn(MOSHI, reply)]
    return Dialogue(turns, chosen)


def load_jsonl_dialogues(path: Path) -> list[Dialogue]:
    """Read a user's dialogues, one JSON object per line; clear errors on anything else."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dialogue file {path} not found")
    speakers = {"moshi": MOSHI, "speaker_main": MOSHI, "main": MOSHI, "assistant": MOSHI, "user": USER}
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            turns = [Turn(speakers[str(t["speaker"]).lower()], str(t["text"]).strip()) for t in obj["turns"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}:{n}: expected {{\"turns\": [{{\"speaker\": \"moshi\"|\"user\", \"text\": "
                              f"...}}]}} ({type(exc).__name__}: {exc})") from exc
        turns = [t for t in turns if t.text]
        split = obj.get("split")
        if split not in (None, "train", "valid", "test"):
            raise ConfigError(f"{path}:{n}: split must be train, valid or test, not {split!r}")
        if not turns:
            raise ConfigError(f"{path}:{n}: a dialogue without any text")
        out.append(Dialogue(turns, ["jsonl"], split))
    if not out:
        raise ConfigError(f"{path}: no dialogues in the file")
    return out


_CHUNK_BREAK = re.compile(r"(?<=[,.;:!?])\s+")


def chunk_text(text: str) -> list[list[str]]:
    """Split a turn into clauses at punctuation: each clause is synthesized on its own and the pauses between
    clauses come from the turn-taking model. Words keep their punctuation (as Whisper transcripts do)."""
    return [part.split() for part in _CHUNK_BREAK.split(text.strip()) if part.split()]
