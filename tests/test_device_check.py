"""scripts/device_check.py rehearsed on CPU (--tiny): every part runs and lands in the JSON and the table, so the
run on a lent GPU is the rehearsed one. The numbers themselves are not checked (speed is measured, not tested)."""
import json

from scripts import device_check


def test_device_check_tiny_writes_every_part(tmp_path, capsys):
    results = device_check.main(["--tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved["environment"]["platform"] == "cpu" and saved["environment"]["command"].endswith("--tiny")
    train, *modern = saved["train"]  # the classic d2 step, then the modern recipe's with FP8 (a GPU run: also bf16)
    for row in saved["train"]:
        assert "error" not in row, row.get("traceback")
        assert row["depth"] == 2 and row["tokens_per_s"] > 0 and row["mfu_percent"] is None  # no CPU peak
    assert train["device_batch_size"] == 2 and train["compiled_peak_bytes"] > 0 and train["recipe"] == "classic"
    assert [(row["recipe"], row["fp8"], row["label"]) for row in modern] == [("modern", True, "modern fp8")]
    attention = saved["attention"]
    assert "error" not in attention and [row["window"] for row in attention["windows"]] == [None, 16]
    assert all(row["xla_ms"] > 0 and row["cudnn_ms"] is None for row in attention["windows"])
    engine = saved["engine"]
    assert "error" not in engine, engine.get("traceback")
    assert [row["batch"] for row in engine["decode"]] == [1, 2] and engine["prefill_ms"] > 0
    assert all(row["tokens_per_s"] > 0 and row["bytes_per_step"] > 0 for row in engine["decode"])
    table = (tmp_path / "device_check.md").read_text()
    assert "| d2 (" in table and "| d2 modern fp8 (" in table and "| d2 batch 2 |" in table and "unavailable" in table
    assert "window 16 |" in table and " / - GiB |" in table  # no measured peak on a CPU: the compiler's alone
    assert results["train"] == saved["train"] and table in capsys.readouterr().out
