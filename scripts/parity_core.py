"""Score the CORE tasks with nanochat's core_eval (PyTorch) and with ours, on the same random weights and the same
bundle examples, and count the examples scored differently. Uses $NANOCHAT_BASE_DIR/tokenizer/ and eval_bundle/.

    python -m scripts.parity_core --nanochat /tmp/nanochat --max-per-task 12     # the checkout: see scripts/__init__.py
"""
import os
import time

from nanochat_jax.evaluation import core
from nanochat_jax.common import CompileCount, get_base_dir
from scripts import nanochat_parser, parse_with_checkout, random_pair


def main(argv=None):
    p = nanochat_parser(__doc__)
    p.add_argument("--max-per-task", type=int, default=12)
    args = parse_with_checkout(p, argv)
    import torch
    from nanochat import core_eval as ref_core

    tokenizer, ref_tokenizer, ref_model, model = random_pair()

    bundle = os.path.join(get_base_dir(), "eval_bundle")
    tasks, _ = core.load_bundle(bundle)
    total = differing = 0
    ref_seconds = our_seconds = 0.0
    with CompileCount() as compiles:
        for task in tasks:
            data = core.load_task_data(bundle, task, args.max_per_task)
            meta = {"task_type": task["icl_task_type"], "num_fewshot": task["num_fewshot"][0],
                    "continuation_delimiter": task.get("continuation_delimiter", " ")}
            t0 = time.time()
            with torch.no_grad():
                ref = [bool(ref_core.evaluate_example(i, ref_model, ref_tokenizer, data, "cpu", meta))
                       for i in range(len(data))]
            t1 = time.time()
            ours = core.evaluate_task(model, tokenizer, data, meta["task_type"], meta["num_fewshot"],
                                      meta["continuation_delimiter"])
            diff = sum(a != b for a, b in zip(ref, ours))
            ref_seconds, our_seconds = ref_seconds + t1 - t0, our_seconds + time.time() - t1
            total, differing = total + len(data), differing + diff
            print(f"{task['label']:<34} nanochat {sum(ref):>4}/{len(ref)} | ours {sum(ours):>4}/{len(ours)} | "
                  f"differing {diff} | {t1 - t0:.0f}s vs {time.time() - t1:.0f}s")
    print(f"{differing} of {total} examples scored differently")
    print(f"wall time: nanochat {ref_seconds:.0f}s, ours {our_seconds:.0f}s (ours: {compiles})")


if __name__ == "__main__":
    main()
