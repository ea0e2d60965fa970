"""Compression of our tokenizer (bytes per token) on several kinds of text and on the first row group of the train
and validation shards, against GPT-2 and GPT-4's encodings (whose ranks tiktoken downloads once; offline, ours alone).

    python -m tokenizer.eval
"""
import tiktoken

from nanochat_jax.common import run_entry_point
from nanochat_jax.evaluation import report
from nanochat_jax.data.dataset import iter_texts, standin_corpus
from nanochat_jax.data.tokenizer import Tokenizer, get_tokenizer

SAMPLES = {
    "news": "GENEVA, March 3 - Delegates from forty countries agreed late on Tuesday to a framework for sharing "
            "river water during droughts, ending talks that had stalled for two years. The agreement sets quotas "
            "that shrink in proportion when flows fall below a seasonal average, and creates a panel of hydrologists "
            "to publish the measurements every month. \"Nobody got everything they wanted,\" said the chair of the "
            "talks, \"which is usually the sign of a fair deal.\" Ratification is expected to take eighteen months.",
    "korean": "오늘 아침 서울에는 첫눈이 내렸습니다. 기상청은 오후부터 기온이 크게 떨어질 것으로 예보했으며, 출근길 "
              "빙판길에 주의해 달라고 당부했습니다. 시민들은 두꺼운 외투를 꺼내 입고 따뜻한 음료를 손에 든 채 바쁜 "
              "걸음을 옮겼습니다.",
    "code": "def merge_intervals(intervals):\n"
            "    \"\"\"Merge overlapping [start, end] pairs; returns a new sorted list.\"\"\"\n"
            "    merged = []\n"
            "    for start, end in sorted(intervals):\n"
            "        if merged and start <= merged[-1][1]:\n"
            "            merged[-1][1] = max(merged[-1][1], end)\n"
            "        else:\n"
            "            merged.append([start, end])\n"
            "    return merged\n\n"
            "if __name__ == \"__main__\":\n"
            "    print(merge_intervals([[1, 3], [2, 6], [8, 10], [15, 18]]))\n",
    "math": "Let $f(x) = \\sum_{n=0}^{\\infty} \\frac{x^n}{n!}$. Then $f'(x) = f(x)$ and $f(0) = 1$, so $f(x) = "
            "e^x$. For the integral, substitute $u = x^2$: \\[ \\int_0^1 2x\\, e^{x^2}\\, dx = \\int_0^1 e^u\\, du = "
            "e - 1 \\approx 1.71828. \\] Hence 3 * 17 = 51, 2^10 = 1024 and 1234567 / 89 = 13871.54 (rounded).",
    "science": "Photosynthesis converts light energy into chemical energy stored in glucose. In the light-dependent "
               "reactions, chlorophyll in the thylakoid membranes absorbs photons, splitting water and releasing "
               "oxygen; the resulting ATP and NADPH then drive the Calvin cycle in the stroma, where the enzyme "
               "RuBisCO fixes carbon dioxide into three-carbon sugars.",
}


def local_shard_samples() -> dict[str, str]:
    samples = {}
    for split in ("train", "val"):
        try:
            samples[f"{split}-shard"] = "\n".join(next(iter_texts(split)))
        except (FileNotFoundError, StopIteration, ValueError) as e:
            print(f"(no {split} shard sample: {e})")
    return samples


def load_reference(name: str):
    """An OpenAI encoding (from the network or tiktoken's cache), with <|endoftext|> as its BOS."""
    try:
        return Tokenizer(tiktoken.get_encoding(name), bos_token="<|endoftext|>")
    except Exception as e:  # offline: tiktoken tries to download the ranks
        print(f"{name}: unavailable ({type(e).__name__}: tiktoken downloads its ranks on first use and could not)")
        return None


def main():
    tokenizers = {"ours": get_tokenizer(), "gpt2": load_reference("gpt2"), "gpt4": load_reference("cl100k_base")}
    tokenizers = {label: tok for label, tok in tokenizers.items() if tok is not None}
    samples = SAMPLES | local_shard_samples()
    vocab = "  ".join(f"{n}={t.get_vocab_size():,}" for n, t in tokenizers.items())
    print(f"vocabulary sizes: {vocab}\nbytes per token (higher compresses better):")
    print(f"{'text':<14}{'bytes':>10}" + "".join(f"{n:>10}" for n in tokenizers))
    ratios = {}
    for sample_name, text in samples.items():
        n_bytes = len(text.encode("utf-8"))
        encoded = [(tok, tok.encode(text)) for tok in tokenizers.values()]
        assert all(tok.decode(ids) == text for tok, ids in encoded), f"round trip failed on {sample_name}"
        row = [n_bytes / len(ids) for _, ids in encoded]
        print(f"{sample_name:<14}{n_bytes:>10,}" + "".join(f"{r:>10.2f}" for r in row))
        ratios[f"bytes per token, {sample_name}"] = ", ".join(f"{n} {r:.2f}" for n, r in zip(tokenizers, row))
    report.log(report.TOKENIZER_EVALUATION, ratios, report.standin(standin_corpus()))


if __name__ == "__main__":
    run_entry_point(main)
