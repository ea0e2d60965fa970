"""Tests run on CPU with 8 virtual devices so every sharding path is exercised; set before jax is imported."""
import os
import subprocess
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["NANOCHAT_BASE_DIR"] = tempfile.mkdtemp(prefix="nanochat_jax_tests_")  # never touch the user's cache
# XLA compiles dominate the suite's time and many tests compile the same programs (every run of an entry point
# builds its step afresh): a compilation cache of this run's own, which the entry points the tests start inherit
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "jax_compilation_cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from nanochat_jax.model.gpt import GPT, GPTConfig  # noqa: E402
from nanochat_jax.data.tokenizer import Tokenizer  # noqa: E402

WORDS = ("the model reads every token once and predicts what comes next while the optimizer keeps two moments "
         "of each gradient data shards flow through a packing buffer 12 345 6789 hello world").split()


def make_text(n_words: int, seed: int = 0) -> str:
    """Common words with some random letter strings mixed in (so a BPE has plenty of pairs to merge)."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) if rng.random() < 0.8 else "".join(rng.choices("abcdefghijklmnop", k=rng.randint(2, 7)))
             for _ in range(n_words)]
    return " ".join(words) + " naïve café 東京 🙂 x+=1;\n"


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    docs = [make_text(200, seed) for seed in range(50)]
    return Tokenizer.train_from_iterator(iter(docs), vocab_size=512)


def randomize(model: GPT, seed: int = 0, std: float = 0.3):
    """Give every parameter random values (nanochat's init zeroes lm_head and the output projections,
    which would hide most bugs)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    import jax
    pure = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * std).astype(np.float32), pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def tiny_config(**overrides) -> GPTConfig:
    kwargs = dict(sequence_len=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return GPTConfig(**(kwargs | overrides))


# Jitted calls: eager NNX dispatches (and compiles) op by op, which is much slower even for one call.
@nnx.jit
def logits_of(model, idx):
    return model(idx)


@nnx.jit
def cached_step(model, idx, cache, pos):
    return model.forward_cached(idx, cache, pos)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module: str, *args: str, check: bool = False, env: dict | None = None):
    """Run an entry point as a user would (python -m ...) from the repository root; returns the CompletedProcess."""
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=None if env is None else os.environ | env)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed:\n{result.stdout}\n{result.stderr}")
    return result
