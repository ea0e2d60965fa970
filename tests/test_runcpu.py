"""scripts/runcpu.sh --smoke, the README's main command at its smallest size, offline: every stage runs on the local
stand-ins and the report card says so."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_runcpu_smoke_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a laptop
    env.update(NANOCHAT_BASE_DIR=str(tmp_path), NANOCHAT_OFFLINE="1", PYTHONPATH=REPO,
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    env.pop("MIXTURE", None)
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "runcpu.sh"), "--smoke"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "no network" in out and "LOCAL STAND-IN" in out and "CORE is skipped" in out

    # every stage left a loadable checkpoint directory under the runcpu tag
    for stage in ("base", "mid", "chatsft", "chatrl"):
        directory = tmp_path / f"{stage}_checkpoints" / "runcpu"
        assert any(p.name.isdigit() for p in directory.iterdir()), f"no checkpoint in {directory}"
    assert (tmp_path / "base_data" / "LOCAL_STANDIN.txt").exists()

    report_dir = tmp_path / "report"
    sections = {p.stem: json.loads(p.read_text()) for p in report_dir.glob("*.json") if p.stem != "header"}
    assert set(sections) == {"tokenizer-training", "tokenizer-evaluation", "base-model-training",
                             "base-model-evaluation", "chat-evaluation-base", "midtraining", "chat-evaluation-mid",
                             "chat-sft", "chat-evaluation-sft", "chat-rl", "chat-evaluation-rl",
                             "what-to-expect-of-this-model"}
    for slug in ("base-model-training", "midtraining", "chat-sft", "chat-rl", "chat-evaluation-sft"):
        assert any("stand-in" in item for item in sections[slug]["data"]), f"{slug} is not labelled a stand-in"
    sft = {k: v for item in sections["chat-sft"]["data"] for k, v in item.items()}
    assert {"val_loss", "arithmetic_acc", "spelling_acc"} <= set(sft)  # SFT's own metrics on the stand-ins
    chat = {k: v for item in sections["chat-evaluation-rl"]["data"] for k, v in item.items()}
    assert 0.0 <= chat["Arithmetic"] <= 1.0 and 0.0 <= chat["LocalSpellingBee"] <= 1.0
    assert chat["Arithmetic chance"] == 0.0 and 0.0 <= chat["Arithmetic tool calls"] <= 1.0
    base = {k: v for item in sections["base-model-evaluation"]["data"] for k, v in item.items()}
    assert base["unigram bpb (no context)"] > 0
    expect = {k: v for item in sections["what-to-expect-of-this-model"]["data"] for k, v in item.items()}
    assert "knows no facts" in expect["in one line"] and "How many shells" in expect["a question and its answer"]
    # the line says what the scores were, each against its chance level (here: nothing learned yet)
    above = sum(chat[t] > chat[f"{t} chance"] for t in ("Arithmetic", "LocalSpellingBee", "LocalSimpleSpelling"))
    said = "not yet right more often than chance" if not above else f"right more often than chance on {above} of 3"
    assert "(chance 0%)" in expect["in one line"] and said in expect["in one line"], expect
    assert "python -m serve.cli -g runcpu -i rl" in out and "python -m serve.web -g runcpu -i rl" in out  # next
    assert "User: Nora has 38 shells" in out and "Assistant:" in out  # the question and the answer, printed

    report = (report_dir / "report.md").read_text()
    assert report.index("LOCAL STAND-IN DATA") < report.index("## Environment")
    assert "| Arithmetic | 0.0000 |" in report and "| unigram bpb (no context) |" in report and "## Plots" in report
    for plot in ("base_curves.png", "mid_curves.png", "sft_curves.png", "rl_curves.png", "chat_evals.png"):
        assert (report_dir / plot).stat().st_size > 1000
