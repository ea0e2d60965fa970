"""The pipeline scripts: valid bash, and every `python -m` stage they run accepts the flags they pass (checked with
the stage's own argument parser, variables filled with sample values). The GPU/TPU runs themselves cannot run here."""
import importlib
import os
import re
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["runcpu.sh", "speedrun.sh", "run1000.sh", "speedrun_tpu.sh"]
SAMPLES = {'"${mesh[@]}"': "--mesh data:8", '"${run[@]}"': "--run test", '"${core[@]}"': "--max-per-task 16",
           '"$REMAT"': "full", '"${sandbox[@]}"': "--unsafe-sandbox",
           '"${base_flags[@]}"': "--recipe modern --target-param-data-ratio 8", '"${fp8[@]}"': "--fp8"}


def commands(script: str) -> list[list[str]]:
    with open(os.path.join(REPO, "scripts", script)) as f:
        text = f.read().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("python -m "):
            continue
        for pattern, value in SAMPLES.items():
            line = line.replace(pattern, value)
        line = line.replace('"$MIXTURE"', "local").replace('"$rl_task"', "Arithmetic")
        line = line.replace('"$chat_tasks"', "Arithmetic").replace('"$tag"', "d20")
        line = re.sub(r'"\$[a-z_]+"', "7", line)  # "$depth", "$seq", ...: a number fits every numeric flag
        line = re.sub(r'"\$[A-Z_]+"', "8", line).split(" > ")[0].rstrip("&").strip()
        found.append(shlex.split(line)[2:])
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_valid_bash(script):
    subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", script)], check=True)


def test_every_stage_accepts_the_flags_the_scripts_pass():
    checked = set()
    for script in ("runcpu.sh", "speedrun.sh"):
        for module, *argv in commands(script):
            parse = getattr(importlib.import_module(module), "parse_args", None)
            if parse is not None:
                parse(argv)  # argparse exits (SystemExit) on an unknown or malformed flag
                checked.add(module)
    assert checked == {"train.base", "train.mid", "train.sft", "train.rl", "evals.base", "evals.chat"}


def test_runcpu_refuses_an_unknown_size():
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "runcpu.sh"), "--huge"], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 2 and "usage" in result.stderr
