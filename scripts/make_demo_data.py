"""Write the demo's synthetic instruction data: moetune/recipes/data/demo_{train,eval}.jsonl (deterministic).

    python scripts/make_demo_data.py

Small lookup and copy tasks (next weekday, counting, colours, reversing a list, adding small numbers) in chat
format: a tiny random model learns them within a few minutes on a CPU, so the demo visibly learns.
"""

import json
import random
from pathlib import Path


DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
COLOURS = {"banana": "yellow", "sky": "blue", "grass": "green", "snow": "white", "coal": "black",
           "tomato": "red", "carrot": "orange", "lemon": "yellow", "leaf": "green", "cloud": "white"}
ANIMALS = "cat dog bird fish horse cow sheep lion tiger fox".split()


def example(rng: random.Random) -> tuple[str, str]:
    task = rng.randrange(6)
    if task == 0:
        i = rng.randrange(7)
        return f"What day comes after {DAYS[i]}?", f"{DAYS[(i + 1) % 7]}."
    if task == 1:
        i = rng.randrange(12)
        return f"What month comes after {MONTHS[i]}?", f"{MONTHS[(i + 1) % 12]}."
    if task == 2:
        n = rng.randrange(2, 11)
        return f"Count from one to {NUMBERS[n]}.", " ".join(NUMBERS[1 : n + 1]) + "."
    if task == 3:
        thing = rng.choice(sorted(COLOURS))
        return f"What colour is {'the' if thing in ('sky', 'grass', 'snow') else 'a'} {thing}?", f"It is {COLOURS[thing]}."
    if task == 4:
        items = rng.sample(ANIMALS, rng.randrange(2, 5))
        return f"List in reverse: {', '.join(items)}", ", ".join(reversed(items))
    a, b = rng.randrange(6), rng.randrange(7)
    return f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a + b].capitalize()}."


def write(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            question, answer = example(rng)
            row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "moetune" / "recipes" / "data"
    out.mkdir(parents=True, exist_ok=True)
    write(out / "demo_train.jsonl", 600, seed=0)
    write(out / "demo_eval.jsonl", 48, seed=1)
    print(f"wrote {out}/demo_train.jsonl and demo_eval.jsonl")
