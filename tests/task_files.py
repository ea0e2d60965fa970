"""Small task files in each dataset's own schema under $NANOCHAT_BASE_DIR/task_data/, as an offline machine has
them; and a tiny base checkpoint to start the chat stages from."""
import json
import random

from flax import nnx

from conftest import randomize

WORDS = ["apple", "banana", "strawberry", "kiwi", "mississippi", "letter", "model", "token", "cherry", "grape"]


def write(base, task, split, rows):
    path = base / "task_data" / task
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def mc_row(rng, i):
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    choices = [str(a + b + d) for d in (-1, 0, 1, 2)]
    rng.shuffle(choices)
    return {"question": f"what is {a} plus {b}? ({i})", "subject": "math", "choices": choices,
            "answer": choices.index(str(a + b))}


def arc_row(rng, i):
    row = mc_row(rng, i)
    return {"id": str(i), "question": row["question"], "answerKey": "ABCD"[row["answer"]],
            "choices": {"text": row["choices"], "label": list("ABCD")}}


def gsm8k_row(rng, i):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return {"question": f"Tom has {a} bags with {b} apples each. How many apples? ({i})",
            "answer": f"He has {a}*{b} = <<{a}*{b}={a * b}>>{a * b} apples.\n#### {a * b}"}


def chat_row(rng, i):
    word = rng.choice(WORDS)
    return {"messages": [{"role": "user", "content": f"say {word} ({i})"},
                         {"role": "assistant", "content": f"{word} {word}, as you asked."}]}


def write_all_tasks(base, n=24):
    rng = random.Random(0)
    write(base, "smoltalk", "train", [chat_row(rng, i) for i in range(n)])
    write(base, "smoltalk", "test", [chat_row(rng, i) for i in range(n // 2)])
    write(base, "mmlu", "auxiliary_train", [{"train": mc_row(rng, i)} for i in range(n)])
    write(base, "mmlu", "test", [mc_row(rng, i) for i in range(n // 2)])
    write(base, "gsm8k", "train", [gsm8k_row(rng, i) for i in range(n)])
    write(base, "gsm8k", "test", [gsm8k_row(rng, i) for i in range(n // 2)])
    for subset in ("arc_easy", "arc_challenge"):
        write(base, subset, "train", [arc_row(rng, i) for i in range(n // 2)])
        write(base, subset, "test", [arc_row(rng, i) for i in range(n // 2)])
    write(base, "humaneval", "test", [{"task_id": f"t/{i}", "prompt": f"def add{i}(a, b):\n",
                                       "canonical_solution": "    return a + b\n", "entry_point": f"add{i}",
                                       "test": "def check(f):\n    assert f(1, 2) == 3\n"} for i in range(3)])
    (base / "task_data" / "identity").mkdir(parents=True, exist_ok=True)
    (base / "task_data" / "identity" / "identity_conversations.jsonl").write_text("".join(
        json.dumps(chat_row(rng, i)["messages"]) + "\n" for i in range(4)))
    (base / "task_data" / "words").mkdir(parents=True, exist_ok=True)
    (base / "task_data" / "words" / "words_alpha.txt").write_text("\n".join(WORDS) + "\n")


def write_base_checkpoint(base, tokenizer, config, tag="d2", seed=0):
    """A base model with random weights (lm_head included, so it is not uniform) as train.base would leave it."""
    from nanochat_jax.training.checkpoint import Checkpointer, model_meta
    from nanochat_jax.model.gpt import GPT
    model = randomize(GPT(config, rngs=nnx.Rngs(seed)), seed=seed, std=0.05)
    checkpointer = Checkpointer(str(base / "base_checkpoints" / tag), async_save=False)
    checkpointer.save(0, {"params": nnx.to_pure_dict(nnx.state(model))}, model_meta(config, 0))
    checkpointer.save_tokenizer(tokenizer)
    checkpointer.close()
