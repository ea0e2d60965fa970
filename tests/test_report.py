"""The report card from logged sections: header, sections in pipeline order, the summary table, wall time, cost,
plots from metrics.jsonl."""
import json
import os

import pytest

from nanochat_jax.evaluation import report


def test_report_from_stage_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    report.reset()
    runs = {}
    for stage, key in (("base", "val_bpb"), ("rl", "reward")):
        runs[stage] = tmp_path / f"{stage}_run"
        runs[stage].mkdir()
        (runs[stage] / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 3.0 - 0.1 * s, key: 1.0 + 0.01 * s}) + "\n" for s in range(10)))
    # logged out of order: the report puts them in pipeline order
    report.log("Chat evaluation rl", {"GSM8K": 0.1})
    report.log("Base model training", {"depth": 4}, {"checkpoint_dir": str(runs["base"]), "steps": 123456})
    report.log("Base model evaluation", {"CORE": 0.2, "val bpb": 0.9, "unigram bpb (no context)": 2.5})
    report.log("Chat evaluation base", {"GSM8K": 0.0}, {"GSM8K well-formed replies": 0.0})  # before chat training
    report.log("Chat evaluation mid", {"ARC-Easy": 0.3, "GSM8K": 0.05}, {"ARC-Easy chance": 0.25, "GSM8K chance": 0.0},
               {"GSM8K well-formed replies": 0.75, "GSM8K tool calls": 0.5}, {"ChatCORE": None})
    report.log("Chat evaluation sft", {"ARC-Easy": 0.35, "GSM8K": 0.08, "MMLU": 0.31}, {"ChatCORE": 0.12})
    report.log("Chat RL", {"checkpoint_dir": str(runs["rl"])}, {})
    text = open(report.generate()).read()

    assert text.startswith("# nanochat-jax report card") and "## Environment" in text and "- Code: files" in text
    order = [text.index(f"## {name}") for name in ("Base model training", "Base model evaluation",
                                                    "Chat evaluation base", "Chat evaluation mid", "Chat evaluation sft", "Chat RL",
                                                    "Chat evaluation rl", "Summary")]
    assert order == sorted(order)
    assert "- steps: 123,456" in text and "- depth: 4" in text
    assert "| metric | chance | BASE | MID | SFT | RL |" in text
    assert "| CORE | - | 0.2000 | - | - | - |" in text
    assert "| val bpb | - | 0.9000 | - | - | - |" in text and "| unigram bpb (no context) | - | 2.5000 |" in text
    assert "| ARC-Easy | 0.2500 | - | 0.3000 | 0.3500 | - |" in text
    assert "| GSM8K | 0.0000 | 0.0000 | 0.0500 | 0.0800 | 0.1000 |" in text
    assert text.index("| GSM8K |") < text.index("| GSM8K well-formed replies | - | 0.0000 | 0.7500 | - | - |") < text.index(
        "| GSM8K tool calls | - | - | 0.5000 |")
    assert "| ChatCORE | - | - | - | 0.1200 | - |" in text
    assert "Total wall clock time: 0h00m" in text and "Estimated cost:" in text
    assert "LOCAL STAND-IN" not in text  # real data: no banner
    for png in ("base_curves.png", "rl_curves.png", "chat_evals.png"):
        assert f"![{png}]({png})" in text and (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"

    # a stage on stand-in data: the banner comes first and names it; a None note adds nothing
    report.log("Midtraining", {"steps": 3}, report.standin("generated chat tasks"), report.standin(None))
    text = open(report.generate()).read()
    assert text.index("LOCAL STAND-IN DATA") < text.index("## Environment")
    assert "> - Midtraining: generated chat tasks" in text and text.count("> - ") == 1

    # the run's last words: what to expect of the model, and a question with its answer, after every stage
    from scripts import report as report_cli
    chat = tmp_path / "reply.txt"
    chat.write_text("User: What is 12 plus 7?\nAssistant: 19\n")
    report_cli.main(["expect", "--line", "knows the chat format, no facts", "--chat-file", str(chat)])
    text = open(report.generate()).read()
    assert text.index("## Chat evaluation rl") < text.index("## What to expect of this model") < text.index("## Summary")
    assert "- in one line: knows the chat format, no facts" in text
    assert "- a question and its answer: User: What is 12 plus 7? / Assistant: 19" in text
    with pytest.raises(SystemExit):
        report_cli.main(["expect"])  # a line is required

    archive = report.reset()  # a new run starts clean; the last run's report is kept, not deleted
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["header.json", "previous"]
    assert "report.md" in os.listdir(archive)


def test_cost_estimate():
    assert report.estimated_cost("8 x NVIDIA H100 80GB HBM3", 2.0) == pytest.approx(48.0)
    assert report.estimated_cost("8 x cpu", 2.0) is None
