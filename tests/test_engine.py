import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import logits_of, randomize, tiny_config
from nanochat_jax.inference.calculator import use_calculator
from nanochat_jax.inference.engine import Engine
from nanochat_jax.model.gpt import GPT


@pytest.fixture(scope="module")
def engine(tokenizer):
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=64), rngs=nnx.Rngs(0)), std=0.5)
    return Engine(model, tokenizer, chunk=8)


def test_greedy_equals_full_forward_decoding(engine, tokenizer):
    model = nnx.merge(engine.graphdef, engine.params)
    prompt = tokenizer.encode("the model reads", prepend=tokenizer.get_bos_token_id())
    seqs, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=20, temperature=0.0)
    ids = list(prompt)
    for _ in range(20):  # naive: a full forward per token (one padded shape: causal attention ignores the padding)
        logits = np.asarray(logits_of(model, jnp.asarray([ids + [0] * (64 - len(ids))])))
        token = int(np.argmax(logits[0, len(ids) - 1]))
        if token in engine.stops:
            break
        ids.append(token)
    assert seqs[0] == ids and seqs[1] == ids
    assert masks[0] == [0] * len(prompt) + [1] * (len(ids) - len(prompt))


def test_sampling_is_seeded(engine, tokenizer):
    prompt = tokenizer.encode("hello world", prepend=tokenizer.get_bos_token_id())
    a, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=1.0, seed=1)
    b, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=1.0, seed=1)
    c, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=1.0, seed=2)
    assert a == b and a != c
    assert len({tuple(s) for s in a}) > 1  # samples differ from each other
    greedy, _ = engine.generate_batch(prompt, max_tokens=12, temperature=0.0)
    top1, _ = engine.generate_batch(prompt, max_tokens=12, temperature=1.0, top_k=1, seed=5)
    assert top1 == greedy


def test_streaming_columns(engine, tokenizer):
    prompt = tokenizer.encode("x", prepend=tokenizer.get_bos_token_id())
    columns = list(engine.generate(prompt, num_samples=2, max_tokens=10, temperature=1.0, seed=3))
    assert 1 <= len(columns) <= 10 and all(len(c) == 2 and len(m) == 2 for c, m in columns)


def test_bad_requests(engine, tokenizer):
    with pytest.raises(ValueError, match="context is 64"):
        list(engine.generate([1] * 64))
    with pytest.raises(ValueError, match="temperature"):
        list(engine.generate([1, 2], temperature=-1))
    with pytest.raises(ValueError, match="top_k"):
        list(engine.generate([1, 2], top_k=0))
    with pytest.raises(ValueError, match="non-empty"):
        list(engine.generate([]))
    with pytest.raises(ValueError, match="token ids"):  # (the embedding gather would clamp it silently)
        list(engine.generate([1, tokenizer.get_vocab_size()]))


class ScriptedModel(nnx.Module):
    """Predicts script[p + 1] for the token at position p: lets a test drive the engine's tool-use path."""

    def __init__(self, config, script):
        self.config, self.dtype = config, jnp.float32
        self.script = nnx.Variable(jnp.asarray(script, jnp.int32))

    def forward_cached(self, idx_BT, cache, pos_B, attend_len=None):
        positions = pos_B[:, None] + jnp.arange(idx_BT.shape[1])[None, :] + 1
        nxt = self.script[...][jnp.minimum(positions, self.script.shape[0] - 1)]
        return 10.0 * jnp.eye(self.config.vocab_size)[nxt], cache


def test_tool_call_is_evaluated_and_forced(tokenizer):
    S = tokenizer.encode_special
    prompt = [tokenizer.get_bos_token_id()] + tokenizer.encode("what is 12*3?")
    expr = tokenizer.encode("12*3")
    result = [S("<|output_start|>")] + tokenizer.encode("36") + [S("<|output_end|>")]
    after = tokenizer.encode(" so it is 36")
    # the script holds placeholders (0) where the engine must force the tool's output
    script = prompt + [S("<|python_start|>")] + expr + [S("<|python_end|>")] + [0] * len(result) + after + \
        [S("<|assistant_end|>")] + [0] * 8
    engine = Engine(ScriptedModel(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=128), script),
                    tokenizer, chunk=4)
    seqs, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=60, temperature=0.0)
    completion = [S("<|python_start|>")] + expr + [S("<|python_end|>")] + result + after
    for seq, mask in zip(seqs, masks):
        assert seq == prompt + completion
        n_call = len(expr) + 2
        assert mask[len(prompt):] == [1] * n_call + [0] * len(result) + [1] * len(after)


@pytest.mark.parametrize("expr,value", [
    ("12*3", 36), ("1,234 + 1", 1235), ("(7 - 2) / 2", 2.5), ("-4 // 3", -2), ("10 % 4", 2),
    ("'strawberry'.count('r')", 3), ('"banana".count("an")', 2),
])
def test_calculator(expr, value):
    assert use_calculator(expr) == value


@pytest.mark.parametrize("expr", ["2**10", "__import__('os')", "open('x')", "x + 1", "'a' * 3", "1/0",
                                  "'abc'.upper()", "[1, 2]", "(1).__class__", "9" * 300, "True + 1"])
def test_calculator_refuses(expr):
    assert use_calculator(expr) is None


def test_top_k_never_samples_outside_the_top_k():
    import jax
    from nanochat_jax.inference.programs import sample
    sample = jax.jit(sample)
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((4, 300)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 4)
    for k in (1, 3, 20):
        allowed = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
        for step in range(50):
            step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.full(4, step))
            tokens = np.asarray(sample(logits, step_keys, jnp.full(4, 2.0), jnp.full(4, k, jnp.int32), jnp.ones(4)))
            assert all(t in allowed[row] for row, t in enumerate(tokens))
    # top-p 0.5 keeps only the most likely tokens whose mass first reaches one half
    peaked = jnp.asarray([[6.0, 4.0] + [0.0] * 98], jnp.float32)  # p = 0.72, 0.10, then 0.002 each
    for step in range(30):
        key = jax.vmap(jax.random.fold_in)(keys[:1], jnp.full(1, step))
        assert int(sample(peaked, key, jnp.ones(1), jnp.zeros(1, jnp.int32), jnp.full(1, 0.5))[0]) == 0


def test_serving_weights_in_the_compute_dtype(tokenizer):
    """With bf16 compute the server holds bf16 weights (no fp32 cast per step) and greedy replies stay those of
    the fp32-master engine (which casts each kernel to bf16 at its matmul anyway)."""
    import jax.numpy as jnp
    from flax import nnx

    from conftest import randomize, tiny_config
    from nanochat_jax.inference.engine import Engine
    from nanochat_jax.model.gpt import GPT
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=64), rngs=nnx.Rngs(0),
                          dtype=jnp.bfloat16), std=0.4)
    master, served = Engine(model, tokenizer), Engine(model, tokenizer, compute_dtype_weights=True)
    import jax
    assert {p.dtype for p in jax.tree.leaves(served.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {p.dtype for p in jax.tree.leaves(master.params)} == {jnp.dtype(jnp.float32)}
    prompt = tokenizer.encode("hello there", prepend="<|bos|>")
    a, _ = master.generate_batch(prompt, max_tokens=12, temperature=0.0)
    b, _ = served.generate_batch(prompt, max_tokens=12, temperature=0.0)
    assert a == b


def test_the_scheduler_warms_up_every_prompt_bucket(tokenizer):
    from flax import nnx

    from conftest import randomize, tiny_config
    from nanochat_jax.inference.engine import Engine
    from nanochat_jax.model.gpt import GPT
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=100), rngs=nnx.Rngs(0)))
    loop = Engine(model, tokenizer).scheduler(slots=2)
    assert loop.warm_up() == 4  # prompts of 16, 32, 64 and 99 tokens: buckets 16 .. 128
    assert loop.busy_slots() == 0 and loop.waiting.empty() and loop.stats["requests_served"] == 0


def test_decode_reads_only_the_filled_cache_and_crosses_buckets(tokenizer):
    """A context of 600 gives a cache of 768 and attention lengths 256, 512, 768: greedy decoding from position 240
    to 280 switches programs mid-way and still equals decoding over the whole cache and full-forward decoding."""
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=600), rngs=nnx.Rngs(1)),
                      std=0.5)
    engine = Engine(model, tokenizer, chunk=8)
    assert engine.max_len == 768 and engine.attend_buckets == [256, 512, 768]
    assert [engine.attend_len(n) for n in (1, 256, 257, 700, 9999)] == [256, 256, 512, 768, 768]
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 256, 240)]
    never = jnp.array([-1], jnp.int32)  # no pause or stop token: every step emits

    def decode(bucketed: bool) -> list[int]:
        cache, state, _ = engine.start(prompt, jax.random.split(jax.random.key(0), 1), 41, 0.0, None, 1.0)
        state, tokens, lengths = state.replace(cache=cache), [int(state.last[0])], set()
        for _ in range(5):
            attend = engine.attend_len(int(state.pos[0]) + 1 + 8) if bucketed else None
            lengths.add(attend)
            state, out = engine.decode(engine.params, state, never, steps=8, attend_len=attend)
            tokens += [int(t) for t in out["tokens"][0]]
        return tokens, lengths

    bucketed, lengths = decode(True)
    assert lengths == {256, 512} and bucketed == decode(False)[0]
    ids = list(prompt)
    for _ in range(len(bucketed)):  # naive: a full forward per token, no cache (one padded shape: causal)
        logits = np.asarray(logits_of(model, jnp.asarray([ids + [0] * (320 - len(ids))])))
        ids.append(int(np.argmax(logits[0, len(ids) - 1])))
    assert ids[len(prompt):] == bucketed


def test_a_later_turn_starts_from_the_parked_cache(engine, tokenizer):
    """Turn 2's prompt is turn 1's prompt and reply plus a new message: the slot that served turn 1 still holds
    those tokens, so only the new ones are prefilled, and the reply equals one from a fresh prefill."""
    from nanochat_jax.inference.scheduler import Finished, Request, Token

    def reply(loop, tokens):
        request = loop.submit(Request(list(tokens), 1, 10, 0.0, None, 1.0, 0))
        out = []
        while len(request.finished) < 1:
            loop.tick()
            while not request.events.empty():
                event = request.events.get_nowait()
                if isinstance(event, Token):
                    out.append(event.id)
                elif isinstance(event, Finished) and event.token is not None:
                    out.append(event.token)
        return out

    loop = engine.scheduler(slots=2, chunk=4)
    turn1 = tokenizer.encode("the model reads every token once and predicts what comes next while the optimizer "
                             "keeps two moments", prepend="<|bos|>")
    first = reply(loop, turn1)
    turn2 = turn1 + first + tokenizer.encode(" hello world")
    assert loop.stats["prompt_tokens_reused"] == 0 and len(turn1) >= 16
    second = reply(loop, turn2)
    assert loop.stats["prompt_tokens_reused"] == len(turn1) + len(first) - 1  # all but the last emitted token
    assert second == reply(engine.scheduler(slots=2, chunk=4), turn2)  # as from a fresh prefill
    other = tokenizer.encode("a different conversation entirely, longer than sixteen tokens", prepend="<|bos|>")
    reply(loop, other)  # shares only <|bos|>: a fresh prefill, into the slot freed longest ago
    assert loop.stats["prompt_tokens_reused"] == len(turn1) + len(first) - 1
    engine.use(nnx.merge(engine.graphdef, engine.params))  # new weights: every parked row is stale
    reply(loop, turn2 + second)
    assert loop.stats["prompt_tokens_reused"] == len(turn1) + len(first) - 1


def test_a_warm_scheduler_compiles_nothing_as_requests_come_and_go(engine, tokenizer):
    """After warm-up and one request of each sample count, requests that finish one by one or several at once, at
    other lengths and budgets, compile no program: the host side of a tick has one shape whatever the traffic (an
    index list of the freed slots used to compile an eager scatter for each new count)."""
    from nanochat_jax.common import CompileCount
    from nanochat_jax.inference.scheduler import Request

    def serve(loop, requests):
        for request in requests:
            loop.submit(request)
        while any(len(r.finished) < r.n for r in requests):
            loop.tick()

    loop = engine.scheduler(slots=4, chunk=4)
    loop.warm_up()
    prompt = tokenizer.encode("the model reads every token", prepend="<|bos|>")
    serve(loop, [Request(prompt, 4, 6, 1.0, 20, 1.0, 0), Request(prompt[:5], 1, 3, 0.0, None, 1.0, 0)])
    with CompileCount() as count:
        serve(loop, [Request(prompt[:3 + i], 1, 3 + 4 * i, 1.0, 20, 0.9, i) for i in range(3)])
        serve(loop, [Request(prompt[:7], 3, 9, 1.0, None, 1.0, 5)])  # (3 samples: padded to 4 rows)
    assert count.programs == 0


def test_a_fresh_engine_compiles_a_handful_of_programs_for_an_eval(tokenizer):
    """An evaluation's first batch on a new engine: prompts in three length buckets, one and two samples each. The
    programs are one prefill (the forward only) per prompt bucket, fresh or onto a parked row (the prompts share a
    start), one first-token sampler and admission per padded sample count, one decode program, the idle state and
    the keys: settings and rows are built inside those programs, not by eager ops (about 40 more programs)."""
    from nanochat_jax.common import CompileCount
    model = randomize(GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=64), rngs=nnx.Rngs(3)))
    fresh = Engine(model, tokenizer, chunk=8)
    prompts = [[tokenizer.get_bos_token_id()] + [7] * n for n in (3, 5, 20, 24, 40, 41)]
    with CompileCount() as count:
        for samples in (1, 2):
            fresh.complete_many(prompts, samples, max_tokens=6, temperature=1.0, top_k=20, rows=4)
    assert count.programs <= 16, count.programs  # 15 here


def test_complete_many_equals_one_prompt_at_a_time(engine, tokenizer):
    """Prompts decoded side by side (more prompts than rows, so slots are reused) give each prompt the completions
    generate_batch gives it alone with the same seed, greedy and sampled."""
    texts = ["the model", "reads every token once", "and predicts what comes next"]
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in texts]
    for temperature, samples in ((0.0, 1), (1.0, 2)):  # 2 prompts at a time: the third reuses freed slots
        many = engine.complete_many(prompts, samples, max_tokens=8, temperature=temperature, top_k=20,
                                    seeds=[7 + i for i in range(len(prompts))], rows=2 * samples)
        for i, prompt in enumerate(prompts):
            alone, _ = engine.generate_batch(prompt, num_samples=samples, max_tokens=8, temperature=temperature,
                                             top_k=20, seed=7 + i)
            assert many[i] == [s[len(prompt):] for s in alone]


def test_the_scheduler_decodes_only_the_busy_rows(engine, tokenizer):
    """One request in a scheduler of 4 slots runs the 1-row decode program (never the 4-row one) and gets the
    tokens a 1-slot scheduler gets; two requests side by side run the 2-row one. Rows that only pad a call (free
    slots) are written back unchanged: the cache row parked by an earlier request still serves its next turn."""
    from nanochat_jax.inference.scheduler import Request
    calls = []
    programs = engine.programs
    full, rows_only = programs.decode, programs.decode_rows

    def counting_rows(params, state, rows, real, *args, **kwargs):
        calls.append(len(rows))
        return rows_only(params, state, rows, real, *args, **kwargs)

    def counting_full(params, state, *args, **kwargs):
        calls.append(state.pos.shape[0])
        return full(params, state, *args, **kwargs)

    def reply(scheduler, requests):
        for r in requests:
            scheduler.submit(r)
        while any(len(r.finished) < r.n for r in requests):
            scheduler.tick()
        return [[e.id for e in list(r.events.queue) if hasattr(e, "id")] for r in requests]

    prompt = tokenizer.encode("the model reads every token once and predicts", prepend="<|bos|>")
    alone = reply(engine.scheduler(slots=1, chunk=4), [Request(list(prompt), 1, 12, 0.0, None, 1.0, 0)])
    programs.decode, programs.decode_rows = counting_full, counting_rows
    try:
        four = engine.scheduler(slots=4, chunk=4)
        assert reply(four, [Request(list(prompt), 1, 12, 0.0, None, 1.0, 0)]) == alone
        assert calls and set(calls) == {1}, calls
        calls.clear()
        pair = reply(four, [Request(list(prompt), 1, 12, 0.0, None, 1.0, 0),
                            Request(list(prompt[:5]), 1, 12, 0.0, None, 1.0, 0)])
        assert pair[0] == alone[0] and 2 in calls and 4 not in calls, calls
        turn2 = list(prompt) + alone[0] + tokenizer.encode(" hello world")
        reused = four.stats["prompt_tokens_reused"]
        again = reply(four, [Request(turn2, 1, 8, 0.0, None, 1.0, 0)])
        assert four.stats["prompt_tokens_reused"] > reused  # from a parked row the padding left alone
        assert again == reply(engine.scheduler(slots=1, chunk=4), [Request(turn2, 1, 8, 0.0, None, 1.0, 0)])
    finally:
        programs.decode, programs.decode_rows = full, rows_only


def test_the_busy_rows_decode_serves_the_modern_model(tokenizer):
    """With smear the cache also records each row's tokens ([1, B, S]): the busy-rows decode copies those rows too,
    and one request in a scheduler of 3 slots gets the tokens of greedy decoding by full forwards."""
    from nanochat_jax.inference.scheduler import Request
    from nanochat_jax.model.gpt import modern_config
    config = modern_config(tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=64, n_layer=3))
    model = randomize(GPT(config, rngs=nnx.Rngs(0)), std=0.5)
    engine = Engine(model, tokenizer, chunk=4)
    prompt = tokenizer.encode("smear reads the token before", prepend="<|bos|>")
    request = Request(list(prompt), 1, 10, 0.0, None, 1.0, 0)
    scheduler = engine.scheduler(slots=3, chunk=4)
    scheduler.submit(request)
    while not request.finished:
        scheduler.tick()
    served = [e.id for e in list(request.events.queue) if hasattr(e, "id")]
    ids = list(prompt)
    for _ in range(len(served)):
        logits = np.asarray(logits_of(model, jnp.asarray([ids + [0] * (64 - len(ids))])))
        ids.append(int(np.argmax(logits[0, len(ids) - 1])))
    assert served and served == ids[len(prompt):]


def test_the_first_column_leaves_when_the_prefill_is_done(engine, tokenizer):
    """Engine.generate yields the first token of every sample before its first decode call; scoring a text goes
    through the scheduler and gives the model's log-probabilities."""
    programs, decodes = engine.programs, []
    full = programs.decode
    programs.decode = lambda *a, **k: decodes.append(1) or full(*a, **k)
    try:
        stream = engine.generate(tokenizer.encode("hello world", prepend="<|bos|>"), num_samples=2, max_tokens=6)
        first, _ = next(stream)
        assert len(first) == 2 and decodes == []
        next(stream)
        assert decodes
        stream.close()
    finally:
        programs.decode = full
    ids = tokenizer.encode("the model reads every token", prepend="<|bos|>")
    model = nnx.merge(engine.graphdef, engine.params)
    logp = np.asarray(jax.nn.log_softmax(logits_of(model, jnp.asarray([ids]))[0].astype(jnp.float32), axis=-1))
    scores = engine.score(ids)
    assert len(scores) == len(ids) - 1
    np.testing.assert_allclose([s[0] for s in scores], [logp[i, ids[i + 1]] for i in range(len(ids) - 1)], atol=1e-4)
