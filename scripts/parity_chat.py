"""Run nanochat's own chat evaluation (scripts/chat_eval.py) and ours on the same random weights and problems, and count
the problems answered differently: the predicted letter (ARC, MMLU) or the whole greedy completion, tool calls included
(GSM8K, SpellingBee, HumanEval). Uses $NANOCHAT_BASE_DIR/tokenizer/ and the task data (task_data/ or the HF hub).

    python -m scripts.parity_chat --nanochat /tmp/nanochat -x 64       # the checkout: see scripts/__init__.py
"""
import importlib.util
import time
from unittest import mock

from nanochat_jax.evaluation.chat_tasks import categorical_outcomes, generative_outcomes
from nanochat_jax.common import CompileCount
from nanochat_jax.inference.engine import Engine
from nanochat_jax.tasks.registry import CHAT_TASKS, CHATCORE_TASKS
from scripts import nanochat_parser, parse_with_checkout, random_pair


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
        t0 = time.time()
        with torch.no_grad(), mock.patch.object(task, "evaluate", wraps=task.evaluate) as ref_spy:
            if task.eval_type == "categorical":
                ref_eval.run_categorical_eval(task, ref_tokenizer, ref_model, 8, args.max_problems)
            else:
                ref_eval.run_generative_eval(task, ref_tokenizer, ref_model, ref_engine, 1, args.max_new_tokens,
                                             0.0, 50, args.max_problems)
        t1 = time.time()
        with CompileCount() as compiled, mock.patch.object(task, "evaluate", wraps=task.evaluate) as our_spy:
            if task.eval_type == "categorical":
                categorical_outcomes(model, tokenizer, task, 8, args.max_problems)
            else:
                generative_outcomes(engine, tokenizer, task, 1, args.max_new_tokens, 0.0, 50, args.max_problems)
        ref, ours = ([c.args[1] for c in spy.call_args_list] for spy in (ref_spy, our_spy))  # the answers, in order
        diff = sum(a != b for a, b in zip(ref, ours)) + abs(len(ref) - len(ours))
        correct = [sum(task.evaluate(task[i], a) for i, a in enumerate(answers)) for answers in (ref, ours)]
        total, differing = total + len(ref), differing + diff
        print(f"{name:<14} nanochat {correct[0]:>3}/{len(ref)} | ours {correct[1]:>3}/{len(ours)} | answers differing "
              f"{diff} | mean answer {sum(map(len, ours)) / max(len(ours), 1):.0f} chars | {t1 - t0:.0f}s vs "
              f"{time.time() - t1:.0f}s ({compiled})")
        for a, b in list((a, b) for a, b in zip(ref, ours) if a != b)[:2]:
            print(f"    nanochat: {a[:120]!r}\n    ours:     {b[:120]!r}")
    print(f"{differing} of {total} answers differ")


if __name__ == "__main__":
    main()
