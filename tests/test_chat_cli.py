import pytest
from flax import nnx

from conftest import randomize, run_module, tiny_config
from nanochat_jax.chat import prompt_for_reply, reply_parts
from nanochat_jax.checkpoint import Checkpointer, model_meta
from nanochat_jax.gpt import GPT


def conversation(n_exchanges, words=3):
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(n_exchanges):
        messages += [{"role": "user", "content": f"question {i} " + "word " * words},
                     {"role": "assistant", "content": f"answer {i}"}]
    return messages + [{"role": "user", "content": "last question"}]


def test_prompt_fits_by_dropping_oldest_exchanges(tokenizer):
    messages = conversation(6)
    full, dropped = prompt_for_reply(tokenizer, messages, context=10_000, reply_room=10)
    assert dropped == 0 and full[-1] == tokenizer.encode_special("<|assistant_start|>")
    ids, dropped = prompt_for_reply(tokenizer, messages, context=len(full) - 5, reply_room=10)
    assert dropped > 0 and dropped % 2 == 0 and len(ids) + 10 <= len(full) - 5
    expected, _ = prompt_for_reply(tokenizer, messages[:1] + messages[1 + dropped:], 10_000, 10)
    assert ids == expected  # the system message stays, the oldest exchanges go
    with pytest.raises(ValueError, match="does not fit the model's context of 20"):
        prompt_for_reply(tokenizer, [{"role": "user", "content": "word " * 50}], context=20, reply_room=5)


def test_reply_parts(tokenizer):
    S = tokenizer.encode_special
    e = tokenizer.encode
    tokens = e("let me see") + [S("<|python_start|>")] + e("2+2") + [S("<|python_end|>")] + \
        [S("<|output_start|>")] + e("4") + [S("<|output_end|>")] + e(" it is 4")
    assert reply_parts(tokenizer, tokens) == [{"type": "text", "text": "let me see"}, {"type": "python", "text": "2+2"},
                                              {"type": "python_output", "text": "4"},
                                              {"type": "text", "text": " it is 4"}]
    assert reply_parts(tokenizer, e("plain")) == "plain"


@pytest.fixture
def sft_checkpoint(tmp_path, tokenizer):
    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size(), sequence_len=48)
    model = randomize(GPT(cfg, rngs=nnx.Rngs(0)), std=0.3)
    ckpt = Checkpointer(str(tmp_path / "chatsft_checkpoints" / "d2"))
    ckpt.save_tokenizer(tokenizer)
    ckpt.save(3, {"params": nnx.to_pure_dict(nnx.state(model))}, model_meta(cfg, 3))
    ckpt.wait()
    return {"NANOCHAT_BASE_DIR": str(tmp_path)}


def test_cli_prompt_and_interactive(sft_checkpoint):
    once = run_module("serve.cli", "-p", "hello", "-t", "0", "-m", "8", env=sft_checkpoint, check=True)
    assert once.stdout.strip()
    session = "hi\n" + "word " * 100 + "\n" + "again\n" * 4 + "clear\nagain\nquit\n"
    result = subprocess_input(["-m", "8"], session, sft_checkpoint)
    assert result.returncode == 0, result.stderr
    assert "(not sent: the message is" in result.stdout and "(new conversation)" in result.stdout
    assert "outgrew the 48-token context" in result.stdout  # five exchanges of up to 16 tokens overflow 48


def subprocess_input(args, stdin, env):
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT
    return subprocess.run([sys.executable, "-m", "serve.cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO_ROOT, env=os.environ | env, timeout=300)


def test_cli_without_checkpoint(tmp_path):
    result = run_module("serve.cli", "-p", "hi", env={"NANOCHAT_BASE_DIR": str(tmp_path)})
    assert result.returncode == 1 and "no checkpoints in" in result.stderr and "import_nanochat" in result.stderr
