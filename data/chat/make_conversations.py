"""Writes data/chat/conversations.jsonl: 300 short multi-turn conversations in OpenAI's
`messages` shape, so that `gptkit finetune --task chat --data data/chat/conversations.jsonl`
runs from a fresh clone.

    python data/chat/make_conversations.py     # the same file every time (seed 0)

Each conversation has two to four exchanges drawn from: a greeting or thanks, a sum of two
small numbers, a fact the user states and asks back later (which needs the history), and an
English sentence to translate into Chinese from the repository's Tatoeba excerpt
(data/translation/, CC BY 2.0 FR: each record names the sentences it uses in
`attribution`). A third of them start with the system message "Answer briefly.".
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
GREETINGS = [("Hello!", "Hello! How can I help?"), ("Hi there.", "Hi! What can I do for you?"),
             ("Good morning!", "Good morning!"), ("Thanks!", "You're welcome."),
             ("Thank you very much.", "Glad to help."), ("Bye!", "Goodbye!")]
FACTS = {"favourite colour": ["red", "blue", "green", "teal", "gold", "plum"],
         "pet": ["a cat", "a dog", "an owl", "a fox", "a hen"],
         "city": ["Oslo", "Lima", "Rome", "Kyiv", "Bern", "Riga"]}


def conversation(rng: random.Random, pairs: list[dict]) -> dict:
    messages = [{"role": "system", "content": "Answer briefly."}] if rng.random() < 1 / 3 else []
    used: list[str] = []
    fact = None
    kinds = rng.sample(["greet", "sum", "fact", "translate", "translate"], rng.randint(2, 4))
    for kind in kinds:
        if kind == "greet":
            ask, answer = rng.choice(GREETINGS)
        elif kind == "sum":
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            ask, answer = f"What is {a} plus {b}?", f"{a + b}."
        elif kind == "fact":
            key = rng.choice(list(FACTS))
            fact = (key, rng.choice(FACTS[key]))
            ask, answer = f"My {key} is {fact[1]}.", "Noted."
        else:
            pair = rng.choice(pairs)
            used.append(pair["attribution"])
            ask, answer = f"Translate into Chinese: {pair['source']}", pair["target"]
        messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
    if fact is not None:  # asked back at the end, after at least one other exchange
        messages += [{"role": "user", "content": f"What is my {fact[0]}?"},
                     {"role": "assistant", "content": f"{fact[1][0].upper()}{fact[1][1:]}."}]
    record = {"messages": messages}
    if used:
        record["attribution"] = used
    return record


def file_text() -> str:
    """The whole file: one conversation per line (tests check it matches what is shipped)."""
    rng = random.Random(0)
    source = HERE.parent / "translation" / "en-zh.test.excerpt.jsonl"
    pairs = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
    pairs = [p for p in pairs if len(p["source"]) <= 48]  # short: a 128-token context holds them
    return "".join(json.dumps(conversation(rng, pairs), ensure_ascii=False) + "\n"
                   for _ in range(300))


def main() -> None:
    (HERE / "conversations.jsonl").write_text(file_text(), encoding="utf-8")


if __name__ == "__main__":
    main()
