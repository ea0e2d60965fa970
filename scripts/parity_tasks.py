"""Compare our chat tasks with nanochat's on the same local files: the conversations, their rendering (ids and
mask), the completion prompts and a mixture's order, example by example. Reads $NANOCHAT_BASE_DIR/task_data/ (GSM8K,
MMLU, ARC, identity conversations: whichever files are present); both render with our tokenizer's encoding.

    python -m scripts.parity_tasks --nanochat /tmp/nanochat       # the checkout: see scripts/__init__.py
"""
import os

from nanochat_jax.common import get_base_dir
from nanochat_jax.data.tokenizer import get_tokenizer
from nanochat_jax.tasks.base import TaskMixture, task_data_path
from nanochat_jax.tasks.choice import ARC, MMLU
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.smoltalk import CustomJSON
from scripts import nanochat_parser, parse_with_checkout


def local_load_dataset(name, subset, split):
    """nanochat's tasks' datasets.load_dataset(hf_id, subset, split=...), answered from the local JSONL files."""
    import datasets
    folder = {"openai/gsm8k": "gsm8k", "cais/mmlu": "mmlu"}.get(name) or subset.lower().replace("-", "_")
    return datasets.load_dataset("json", data_files=task_data_path(folder, f"{split}.jsonl"), split="train")


def main(argv=None):
    parse_with_checkout(nanochat_parser(__doc__), argv)
    import tasks.arc
    import tasks.common
    import tasks.customjson
    import tasks.gsm8k
    import tasks.mmlu
    from nanochat.tokenizer import RustBPETokenizer
    for module in (tasks.arc, tasks.gsm8k, tasks.mmlu):
        module.load_dataset = local_load_dataset
    ours_tok = get_tokenizer()
    ref_tok = RustBPETokenizer(ours_tok.enc, "<|bos|>")
    candidates = [  # (its file in task_data/, name, a maker of our task and nanochat's)
        ("gsm8k/train.jsonl", "GSM8K train", lambda: (GSM8K(split="train"), tasks.gsm8k.GSM8K("main", "train"))),
        ("gsm8k/test.jsonl", "GSM8K test", lambda: (GSM8K(split="test"), tasks.gsm8k.GSM8K("main", "test"))),
        ("mmlu/test.jsonl", "MMLU test", lambda: (MMLU(split="test"), tasks.mmlu.MMLU("all", "test"))),
        ("arc_easy/test.jsonl", "ARC-Easy test", lambda: (ARC("ARC-Easy", "test"), tasks.arc.ARC("ARC-Easy", "test"))),
        ("arc_challenge/test.jsonl", "ARC-Challenge test",
         lambda: (ARC("ARC-Challenge", "test"), tasks.arc.ARC("ARC-Challenge", "test"))),
        ("identity/identity_conversations.jsonl", "identity", lambda: (
            CustomJSON(), tasks.customjson.CustomJSON(task_data_path("identity", "identity_conversations.jsonl")))),
    ]
    pairs = []
    for path, name, make in candidates:
        if not os.path.exists(os.path.join(get_base_dir(), "task_data", path)):
            print(f"{name}: no {path}, skipped")
            continue
        pairs.append(make())
        a, b = pairs[-1]
        counts = {"conversations": 0, "renderings": 0, "completion prompts": 0}
        for i in range(len(a)):
            x, y = a[i], b[i]
            counts["conversations"] += x["messages"] != y["messages"]
            counts["renderings"] += [list(r) for r in ours_tok.render_conversation(x)] != \
                [list(r) for r in ref_tok.render_conversation(y)]
            counts["completion prompts"] += ours_tok.render_for_completion(x) != ref_tok.render_for_completion(y)
        print(f"{name}: {len(a)} examples ({len(b)} in nanochat) | differing: " +
              ", ".join(f"{k} {v}" for k, v in counts.items()))
    if pairs:
        ours_mix = TaskMixture([a for a, _ in pairs] + [pairs[-1][0]])
        ref_mix = tasks.common.TaskMixture([b for _, b in pairs] + [pairs[-1][1]])
        same = len(ours_mix) == len(ref_mix) and all(
            ours_mix[i]["messages"] == ref_mix[i]["messages"] for i in range(len(ours_mix)))
        print(f"a mixture of all of them (the last twice), {len(ours_mix)} examples: "
              f"{'same order' if same else 'ORDER DIFFERS'}")


if __name__ == "__main__":
    main()
