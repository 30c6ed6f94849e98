#!/usr/bin/env python3
"""A synthetic fine-tuning task the base model fails: answer in one fixed JSON shape.

The user gives a sentence about a person in one of several phrasings; the assistant must reply
with exactly `{"name": "...", "age": N, "city": "..."}` and nothing else. SmolLM2-135M-Instruct
answers in prose or in other shapes (0% exact match); a few minutes of LoRA teach it the shape.
The held-out set uses first names, surnames and cities the training set never shows, so passing
it means copying fields into the format, not remembering answers.

    python3 scripts/sft_task.py --out DIR [--train 400] [--test 60] [--seed 7]
    ferrolm eval chat --data DIR/test.jsonl                         # before
    ferrolm finetune --train DIR/train.jsonl --val DIR/val.jsonl --out RUN
    ferrolm eval chat --data DIR/test.jsonl --model RUN             # after
"""
import argparse
import json
import os
import random

FIRST = ["Maria", "Jonas", "Aiko", "Pedro", "Lena", "Omar", "Greta", "Ravi", "Sofia", "Tomas",
         "Nadia", "Felix", "Chen", "Elena", "Marco", "Ingrid", "Yusuf", "Clara", "Dmitri", "Hana",
         "Lucas", "Amara", "Kenji", "Beatriz", "Oskar", "Leila", "Pavel", "Nora", "Mateo", "Ada"]
LAST = ["Keller", "Novak", "Tanaka", "Silva", "Berg", "Haddad", "Lind", "Patel", "Rossi", "Horvat",
        "Ivanova", "Weber", "Wang", "Costa", "Ricci", "Dahl", "Demir", "Moreau", "Orlov", "Sato",
        "Meyer", "Okafor", "Mori", "Santos", "Nilsson", "Karimi", "Kral", "Quinn", "Ortega", "Byrne"]
CITY = ["Lyon", "Porto", "Osaka", "Ghent", "Tartu", "Leeds", "Graz", "Turin", "Bergen", "Split",
        "Cork", "Malmo", "Kyoto", "Basel", "Seville", "Krakow", "Utrecht", "Nantes", "Aarhus",
        "Bilbao", "Dresden", "Lille", "Brno", "Nice", "Genoa", "Riga", "Bremen", "Oulu", "Varna"]
PHRASES = [
    "{name}, {age}, lives in {city}.",
    "{name} is {age} years old and lives in {city}.",
    "Meet {name} from {city}, aged {age}.",
    "{city} is home to {name}, who is {age}.",
    "At {age}, {name} moved to {city}.",
]
INSTRUCTION = "Extract the person's name, age and city as JSON."


def example(rng, firsts, lasts, cities):
    name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
    age = rng.randint(18, 90)
    city = rng.choice(cities)
    text = rng.choice(PHRASES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {"messages": [
        {"role": "user", "content": f"{INSTRUCTION}\n{text}"},
        {"role": "assistant", "content": answer},
    ]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--val", type=int, default=40)
    ap.add_argument("--test", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    # held-out names and cities: the last third of each list never appears in training
    cut = lambda xs: (xs[: len(xs) * 2 // 3], xs[len(xs) * 2 // 3:])
    (f_tr, f_te), (l_tr, l_te), (c_tr, c_te) = cut(FIRST), cut(LAST), cut(CITY)
    os.makedirs(a.out, exist_ok=True)
    for name, n, pools in [("train", a.train, (f_tr, l_tr, c_tr)), ("val", a.val, (f_tr, l_tr, c_tr)),
                           ("test", a.test, (f_te, l_te, c_te))]:
        with open(os.path.join(a.out, f"{name}.jsonl"), "w") as f:
            for _ in range(n):
                f.write(json.dumps(example(rng, *pools)) + "\n")
    print(f"wrote {a.train} train, {a.val} val, {a.test} held-out examples to {a.out}")


if __name__ == "__main__":
    main()
