"""The tiny-talk domain: what the small shipped Moshi is taught to say, and the held-out cases it is graded on.

A deliberately small world a few-million-parameter model can learn from synthetic speech on a CPU: greetings and
goodbyes, spoken questions over a facts table (colours, capitals, animal sounds) and "what is A plus B" for one-digit
numbers. Every fact is in training (a tiny model cannot know facts it never heard); what is held out is the user's
*phrasing* of a question (and, through the synth pipeline's voice split, the user's voice). Moshi's reply ends on
the answer word ("The capital of France is Paris."), so grading is "the text stream after the question contains the
answer".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .scripts import MOSHI, USER, number_words

COLOURS = [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"), ("coal", "black"),
           ("a tomato", "red"), ("chocolate", "brown"), ("an orange", "orange")]
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("Germany", "Berlin"), ("Russia", "Moscow"), ("Peru", "Lima")]
SOUNDS = [("a cow", "moo"), ("a dog", "woof"), ("a cat", "meow"), ("a duck", "quack"), ("a sheep", "baa"),
          ("a lion", "roar"), ("an owl", "hoot"), ("a snake", "hiss")]
NUMBERS = range(1, 10)  # "what is A plus B" for one-digit A and B

# Question phrasings per kind: "train" ones are in the training dialogues, "test" ones only in the evaluation.
PHRASINGS = {
    "colour": {"train": ["What color is {s}?", "What is the color of {s}?", "Which color is {s}?",
                          "What's the color of {s}?", "What color would {s} be?", "Do you know the color of {s}?",
                          "I'd like to know the color of {s}.", "Could you name the color of {s}?",
                          "I wonder what color {s} is.", "Any idea what color {s} is?",
                          "Do you remember what color {s} is?"],
               "test": ["Tell me what color {s} is."]},
    "capital": {"train": ["What is the capital of {s}?", "Which city is the capital of {s}?",
                          "What's the capital city of {s}?", "Name the capital of {s}.",
                          "What city is the capital of {s}?", "Do you know the capital of {s}?",
                          "I'd like to know the capital of {s}.", "Could you name the capital city of {s}?",
                          "I wonder what the capital of {s} is.", "Any idea what the capital of {s} is?",
                          "Do you remember the capital of {s}?"],
                "test": ["Tell me the capital of {s}."]},
    "sound": {"train": ["What sound does {s} make?", "What does {s} say?", "Which sound does {s} make?",
                        "What noise does {s} make?", "What sound do you hear from {s}?",
                        "Do you know the sound {s} makes?", "I'd like to know the sound of {s}.",
                        "Could you name the sound {s} makes?", "I wonder what {s} says.", "Any idea what {s} says?",
                        "Do you remember what {s} says?"],
              "test": ["Tell me what {s} says."]},
    "plus": {"train": ["What is {a} plus {b}?", "How much is {a} plus {b}?", "What's {a} plus {b}?",
                       "What do you get for {a} plus {b}?", "Can you add {a} plus {b}?",
                       "Do you know {a} plus {b}?", "I'd like to know {a} plus {b}.",
                       "Could you work out {a} plus {b}?", "I wonder what {a} plus {b} is.",
                       "Any idea what {a} plus {b} is?", "Do you remember what {a} plus {b} is?"],
             "test": ["Tell me what {a} plus {b} is."]},
}
REPLIES = {"colour": "{S} is {x}.", "capital": "The capital of {s} is {x}.", "sound": "{S} says {x}.",
           "plus": "{a} plus {b} is {x}."}

GREETINGS = [("Hello!", "Hello! How can I help you?"), ("Hi Moshi.", "Hi! What would you like to know?"),
             ("Good morning.", "Good morning! Ask me anything.")]
MOSHI_OPENERS = ["Hello, how can I help you?", "Hi, what would you like to know?"]
# How a dialogue opens: the user greets / Moshi greets first / the user asks straight away (as in `eval talk`).
# Moshi opens no tiny-talk dialogue: where it had learnt to (3 in 10), it greeted over a question asked 1 s into
# the call in 1 of 7 held-out cases and never answered it.
OPENINGS = {"user_greets": 0.4, "moshi_greets": 0.0, "user_asks": 0.6}
GOODBYES = [("Thank you, goodbye!", "Goodbye, see you soon!"), ("Thanks, bye.", "Bye bye, take care!"),
            ("That's all, bye.", "Goodbye!")]


@dataclass(frozen=True)
class Question:
    kind: str  # colour | capital | sound | plus
    text: str  # the user's words
    reply: str  # Moshi's words, ending on the answer
    answer: str  # the answer word, lower case ("paris", "twelve")


def all_facts() -> list[tuple[str, dict]]:
    """(kind, fields) for every fact of the domain: subjects for the table kinds, (a, b) for sums."""
    facts = [(kind, {"s": s, "x": x}) for kind, table in (("colour", COLOURS), ("capital", CAPITALS),
                                                        ("sound", SOUNDS)) for s, x in table]
    facts += [("plus", {"a": number_words(a), "b": number_words(b), "x": number_words(a + b)})
              for a in NUMBERS for b in NUMBERS]
    return facts


def make_question(kind: str, fields: dict, phrasing: str) -> Question:
    text = phrasing.format(**fields)
    text = text[0].upper() + text[1:]
    subject = fields.get("s", "")
    reply = REPLIES[kind].format(S=subject[:1].upper() + subject[1:], **fields)
    reply = reply[0].upper() + reply[1:]
    return Question(kind, text, reply, fields["x"].lower())


def random_question(rng: np.random.Generator, split: str) -> Question:
    """A question in the phrasings of `split` ("train" or "test"); sums are as likely as the three tables together,
    so the model hears each of the 81 sums about as often as each fact."""
    facts = all_facts()
    table = [f for f in facts if f[0] != "plus"]
    sums = [f for f in facts if f[0] == "plus"]
    pool = sums if rng.random() < 0.5 else table
    kind, fields = pool[int(rng.integers(len(pool)))]
    phrasings = PHRASINGS[kind][split]
    return make_question(kind, fields, phrasings[int(rng.integers(len(phrasings)))])


def dialogue_turns(rng: np.random.Generator, split: str, questions: tuple[int, int] = (1, 3)) -> list[dict]:
    """One conversation as moshi-finetune-style turns: an opening (OPENINGS' odds), 1-3 questions, usually a
    goodbye."""
    turns: list[dict] = []
    odds = OPENINGS
    opening = rng.random()
    if opening < odds["user_greets"]:
        hello, reply = GREETINGS[int(rng.integers(len(GREETINGS)))]
        turns += [{"speaker": USER, "text": hello}, {"speaker": MOSHI, "text": reply}]
    elif opening < odds["user_greets"] + odds["moshi_greets"]:
        turns.append({"speaker": MOSHI, "text": MOSHI_OPENERS[int(rng.integers(len(MOSHI_OPENERS)))]})
    for _ in range(int(rng.integers(questions[0], questions[1] + 1))):
        q = random_question(rng, split)
        turns += [{"speaker": USER, "text": q.text}, {"speaker": MOSHI, "text": q.reply}]
    if rng.random() < 0.6:
        bye, reply = GOODBYES[int(rng.integers(len(GOODBYES)))]
        turns += [{"speaker": USER, "text": bye}, {"speaker": MOSHI, "text": reply}]
    return turns


def write_dialogue_scripts(path: Path, count: int, seed: int, test_fraction: float = 0.1) -> Path:
    """A JSONL script file for `openmoshi data synth --script-file`: train dialogues in training phrasings, the
    last `test_fraction` pinned to the test split in held-out phrasings (the synth gives them held-out voices)."""
    rng = np.random.default_rng([seed, 4242])
    n_test = max(1, round(count * test_fraction)) if test_fraction > 0 else 0
    lines = []
    for i in range(count):
        split = "test" if i >= count - n_test else "train"
        lines.append(json.dumps({"turns": dialogue_turns(rng, split), "split": split}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def text_corpus() -> list[str]:
    """Every sentence either speaker can say, in every phrasing: the tokenizer's training text."""
    lines = [t for pair in GREETINGS + GOODBYES for t in pair] + MOSHI_OPENERS
    for kind, fields in all_facts():
        for split in ("train", "test"):
            for phrasing in PHRASINGS[kind][split]:
                q = make_question(kind, fields, phrasing)
                lines += [q.text, q.reply]
    return lines


def eval_questions(count: int, seed: int, split: str = "test") -> list[Question]:
    """Held-out cases: held-out phrasings (split "train": the training phrasings, a diagnostic), facts spread
    evenly over the four kinds."""
    rng = np.random.default_rng([seed, 777])
    facts = all_facts()
    by_kind = {k: [f for f in facts if f[0] == k] for k in PHRASINGS}
    out = []
    for i in range(count):
        kind = list(PHRASINGS)[i % len(PHRASINGS)]
        _, fields = by_kind[kind][int(rng.integers(len(by_kind[kind])))]
        phrasings = PHRASINGS[kind][split]
        out.append(make_question(kind, fields, phrasings[int(rng.integers(len(phrasings)))]))
    return out
