import numpy as np
import pytest

from conftest import make_text
from nanochat_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer

ROUND_TRIPS = [
    "",
    "Hello world! It's 2026; I'm here, you're there.",
    "naïve café, Ελληνικά, русский, עברית, العربية, 東京タワー, 한국어, emoji 🙂👍🏽🇯🇵, combining e\u0301",
    "def f(x):\n\treturn x ** 2  # square\n\n\n    \r\n{\"a\": [1, 2.5e-3]}",
    "numbers 1234567890 and 3.14159 and -42",
    "<|bos|> <|assistant_start|> special strings in user text stay plain text <|python_end|>",
    "\x00\x01 control bytes and \ufffd replacement char " + "a" * 500,
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    specials = {tokenizer.encode_special(s) for s in SPECIAL_TOKENS}
    assert not specials & set(ids)  # special-token strings in text never become special ids
    # token_bytes counts the true UTF-8 bytes of every token
    assert tokenizer.token_bytes()[ids].sum() == len(text.encode("utf-8"))


def test_special_tokens(tokenizer):
    assert tokenizer.get_vocab_size() == 512
    ids = [tokenizer.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(503, 512))  # appended after the 503 learned tokens, in nanochat's order
    assert tokenizer.get_bos_token_id() == ids[0]
    assert tokenizer.decode(ids) == "".join(SPECIAL_TOKENS)
    assert (tokenizer.token_bytes()[ids] == 0).all()


def test_batched_encode_and_prepend_append(tokenizer):
    texts = [make_text(20, s) for s in range(5)]
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    batched = tokenizer.encode(texts, prepend="<|bos|>", append=end, num_threads=2)
    assert batched == [[bos] + tokenizer.encode(t) + [end] for t in texts]
    assert tokenizer.encode("hi", prepend=bos)[0] == bos
    with pytest.raises(TypeError):
        tokenizer.encode(42)


def test_learned_merges_compress(tokenizer):
    text = make_text(100, seed=99)
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 3


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path))
    loaded = Tokenizer.load(str(tmp_path))
    for text in ROUND_TRIPS:
        assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.get_vocab_size() == tokenizer.get_vocab_size()
    np.testing.assert_array_equal(np.load(tmp_path / "token_bytes.npy"), tokenizer.token_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer.train"):
        Tokenizer.load(str(tmp_path / "missing"))


def test_vocab_too_small():
    with pytest.raises(ValueError, match="at least"):
        Tokenizer.train_from_iterator(iter(["abc"]), vocab_size=200)


def S(tokenizer, name):
    return tokenizer.encode_special(name)


def test_render_conversation_with_tool_calls(tokenizer):
    conversation = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is 12*3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "let me compute"},
            {"type": "python", "text": "12*3"},
            {"type": "python_output", "text": "36"},
            {"type": "text", "text": "it is 36"},
        ]},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "welcome"},
    ]}
    ids, mask = tokenizer.render_conversation(conversation)
    e, s = tokenizer.encode, lambda name: S(tokenizer, name)
    expected = [(s("<|bos|>"), 0), (s("<|user_start|>"), 0)]
    expected += [(t, 0) for t in e("be brief\n\nwhat is 12*3?")] + [(s("<|user_end|>"), 0)]
    expected += [(s("<|assistant_start|>"), 0)] + [(t, 1) for t in e("let me compute")]
    expected += [(s("<|python_start|>"), 1)] + [(t, 1) for t in e("12*3")] + [(s("<|python_end|>"), 1)]
    expected += [(s("<|output_start|>"), 0)] + [(t, 0) for t in e("36")] + [(s("<|output_end|>"), 0)]
    expected += [(t, 1) for t in e("it is 36")] + [(s("<|assistant_end|>"), 1)]
    expected += [(s("<|user_start|>"), 0)] + [(t, 0) for t in e("thanks")] + [(s("<|user_end|>"), 0)]
    expected += [(s("<|assistant_start|>"), 0)] + [(t, 1) for t in e("welcome")] + [(s("<|assistant_end|>"), 1)]
    assert list(zip(ids, mask)) == expected
    assert conversation["messages"][1]["content"] == "what is 12*3?"  # the input is not mutated

    short_ids, short_mask = tokenizer.render_conversation(conversation, max_tokens=7)
    assert short_ids == ids[:7] and short_mask == mask[:7]

    prompt = tokenizer.render_for_completion(conversation)
    last_turn = len(e("welcome")) + 2  # <|assistant_start|> welcome <|assistant_end|>
    assert prompt == ids[:-last_turn] + [s("<|assistant_start|>")]


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "hi"}], "should be from 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles must alternate"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "followed by a user"),
    ([{"role": "user", "content": ["list"]}], "user content must be a string"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "unknown part type"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}], "string or a list"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}], "should be from 'assistant'"),
])
def test_bad_conversations(tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        tokenizer.render_conversation({"messages": messages})


def test_render_for_completion_needs_assistant_last(tokenizer):
    with pytest.raises(ValueError, match="last message"):
        tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
