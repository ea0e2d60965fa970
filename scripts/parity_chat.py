"""Run nanochat's own chat evaluation (scripts/chat_eval.py) and ours on the same random weights and problems, and count
the problems answered differently: the predicted letter (ARC, MMLU) or the whole greedy completion, tool calls included
(GSM8K, SpellingBee, HumanEval). Uses $NANOCHAT_BASE_DIR/tokenizer/ and the task data (task_data/ or the HF hub).

    python -m scripts.parity_chat --nanochat /tmp/nanochat -x 64       # the checkout: see scripts/__init__.py
"""
import importlib.util
import time

from nanochat_jax.evaluation.chat_tasks import categorical_outcomes, generative_outcomes
from nanochat_jax.common import CompileCount
from nanochat_jax.inference.engine import Engine
from nanochat_jax.tasks.registry import CHAT_TASKS, CHATCORE_TASKS
from scripts import nanochat_parser, parse_with_checkout, random_pair


class Recorder:
    """A task that remembers every answer it was asked to evaluate, in order."""

    def __init__(self, task):
        self.task, self.answers, self.eval_type = task, [], task.eval_type

    def __len__(self):
        return len(self.task)

    def __getitem__(self, index):
        return self.task[index]

    def evaluate(self, conversation, answer):
        self.answers.append(answer)
        return self.task.evaluate(conversation, answer)


def main(argv=None):
    p = nanochat_parser(__doc__)
    p.add_argument("-a", "--task-name", default="|".join(CHATCORE_TASKS))
    p.add_argument("-x", "--max-problems", type=int, default=64)
    p.add_argument("-m", "--max-new-tokens", type=int, default=48)
    p.add_argument("--unsafe-sandbox", action="store_true", help="allow the unsafe sandbox for HumanEval")
    args = parse_with_checkout(p, argv)
    if "HumanEval" in args.task_name.split("|"):
        from nanochat_jax.sandbox.execution import require
        require(args.unsafe_sandbox, "HumanEval")
    import torch
    from nanochat.engine import Engine as TorchEngine
    # by path: our own `scripts` package shadows nanochat's
    spec = importlib.util.spec_from_file_location("nanochat_chat_eval", f"{args.nanochat}/scripts/chat_eval.py")
    ref_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_eval)

    tokenizer, ref_tokenizer, ref_model, model = random_pair()
    ref_engine, engine = TorchEngine(ref_model, ref_tokenizer), Engine(model, tokenizer)

    total = differing = 0
    for name in args.task_name.split("|"):
        task = CHAT_TASKS[name].make("test")
        ref, ours = Recorder(task), Recorder(task)
        t0 = time.time()
        with torch.no_grad():
            if task.eval_type == "categorical":
                ref_eval.run_categorical_eval(ref, ref_tokenizer, ref_model, 8, args.max_problems)
            else:
                ref_eval.run_generative_eval(ref, ref_tokenizer, ref_model, ref_engine, 1, args.max_new_tokens,
                                             0.0, 50, args.max_problems)
        t1 = time.time()
        with CompileCount() as compiled:
            if task.eval_type == "categorical":
                categorical_outcomes(model, tokenizer, ours, 8, args.max_problems)
            else:
                generative_outcomes(engine, tokenizer, ours, 1, args.max_new_tokens, 0.0, 50, args.max_problems)
        diff = sum(a != b for a, b in zip(ref.answers, ours.answers)) + abs(len(ref.answers) - len(ours.answers))
        correct = [sum(task.evaluate(task[i], a) for i, a in enumerate(r.answers)) for r in (ref, ours)]
        total, differing = total + len(ref.answers), differing + diff
        print(f"{name:<14} nanochat {correct[0]:>3}/{len(ref.answers)} | ours {correct[1]:>3}/{len(ours.answers)} | "
              f"answers differing {diff} | mean answer {sum(map(len, ours.answers)) / max(len(ours.answers), 1):.0f} "
              f"chars | {t1 - t0:.0f}s vs {time.time() - t1:.0f}s ({compiled})")
        for a, b in list((a, b) for a, b in zip(ref.answers, ours.answers) if a != b)[:2]:
            print(f"    nanochat: {a[:120]!r}\n    ours:     {b[:120]!r}")
    print(f"{differing} of {total} answers differ")


if __name__ == "__main__":
    main()
