"""Write a generated fine-tuning task with exact answers as SFT .jsonl files (train.jsonl, eval.jsonl):

    python -m experiments.make_task --task=add --out_dir=/tmp/task_add
    python -m experiments.make_task --task=reverse --out_dir=/tmp/task_rev --format=chat --num_train=4000

Tasks (each answer is a function of its prompt, so held-out exact match measures what was learned):
- add: "12+34=" -> "46", operands below 100;
- reverse: "reverse: abcd ->" -> " dcba", 3-6 lowercase letters.
`--format=completion` writes {"prompt", "completion"} records, `chat` writes {"messages": [user, assistant]}.
Held-out prompts never occur in the training split. The README's fine-tuning demonstration uses it.
"""

import json
import os
import random
import string

from absl import flags

from experiments import cli
from llama_jax.errors import ConfigError

_TASK = flags.DEFINE_enum("task", "add", ["add", "reverse"], "Which task.")
_OUT = flags.DEFINE_string("out_dir", None, "Where train.jsonl and eval.jsonl go.", required=True)
_FORMAT = flags.DEFINE_enum("format", "completion", ["completion", "chat"], "Record format.")
_TRAIN = flags.DEFINE_integer("num_train", 4000, "Training records.")
_EVAL = flags.DEFINE_integer("num_eval", 200, "Held-out records.")
_SEED = flags.DEFINE_integer("seed", 0, "Generator seed.")


def example(task: str, rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) of one random instance."""
    if task == "add":
        a, b = (rng.randrange(100) for _ in range(2))
        return f"{a}+{b}=", str(a + b)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return f"reverse: {word} ->", " " + word[::-1]


def record(prompt: str, answer: str, fmt: str) -> dict:
    if fmt == "completion":
        return {"prompt": prompt, "completion": answer}
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer.strip()}]}


def main(argv):
    rng = random.Random(_SEED.value)
    seen, held_out = set(), []
    # Distinct held-out prompts first, then training prompts that avoid them.
    while len(held_out) < _EVAL.value:
        p, a = example(_TASK.value, rng)
        if p not in seen:
            seen.add(p)
            held_out.append((p, a))
    train, tries = [], 0
    while len(train) < _TRAIN.value:
        tries += 1
        if tries > 100 * _TRAIN.value:
            raise ConfigError(f"--task={_TASK.value} has too few distinct prompts for --num_train={_TRAIN.value}.")
        p, a = example(_TASK.value, rng)
        if p not in seen:
            train.append((p, a))
    os.makedirs(_OUT.value, exist_ok=True)
    for name, rows in (("train", train), ("eval", held_out)):
        with open(os.path.join(_OUT.value, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for p, a in rows:
                f.write(json.dumps(record(p, a, _FORMAT.value)) + "\n")
    print(f"wrote {len(train)} train and {len(held_out)} eval {_TASK.value} records to {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)
