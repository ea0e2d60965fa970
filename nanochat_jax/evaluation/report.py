"""The report card: every stage logs a section, `generate` writes report.md.

    python -m scripts.report reset       # at the start of a run: the header (environment, code size, start time)
    python -m train.base ...             # each entry point logs its section: $NANOCHAT_BASE_DIR/report/<section>.json
    python -m scripts.report generate    # report.md there (+ PNG plots): header, sections, summary table, time, cost
"""
import datetime
import json
import os
import platform
import subprocess

import jax

from nanochat_jax.common import check_writable, get_base_dir
from nanochat_jax.tasks.registry import CHATCORE_TASKS, STANDINS

# the section titles, which every entry point passes to log() by these names; the report keeps this order
TOKENIZER_TRAINING, TOKENIZER_EVALUATION = "Tokenizer training", "Tokenizer evaluation"
BASE_TRAINING, BASE_EVALUATION = "Base model training", "Base model evaluation"
MIDTRAINING, SFT, RL = "Midtraining", "Chat SFT", "Chat RL"


def chat_evaluation(stage: str) -> str:
    """The section of `python -m evals.chat -i <stage>`."""
    return f"Chat evaluation {stage}"


# stage: (training, evaluations); base's chat evaluation (runcpu.sh's "before" of midtraining) joins its column
STAGES = {"base": (BASE_TRAINING, BASE_EVALUATION, chat_evaluation("base")),
          "mid": (MIDTRAINING, chat_evaluation("mid")), "sft": (SFT, chat_evaluation("sft")),
          "rl": (RL, chat_evaluation("rl"))}
EXPECTATIONS = "What to expect of this model"  # one line, and a question with its answer (scripts/report.py)
ORDER = [TOKENIZER_TRAINING, TOKENIZER_EVALUATION, *(t for titles in STAGES.values() for t in titles), EXPECTATIONS]
CORE, CHATCORE = "CORE", "ChatCORE"  # the summary's keys for the two aggregate scores
SUMMARY_METRICS = [CORE, *CHATCORE_TASKS, CHATCORE, *STANDINS]  # the stand-ins last
BPB_METRICS = ["val bpb", "unigram bpb (no context)"]  # base evaluation: the model against token frequencies alone
FORMS = ["well-formed replies", "tool calls"]  # evals.chat logs "<task> <form>" for each generative task
# the summary table's rows: CORE, the bpb pair, then each chat metric followed by its reply forms
SUMMARY_ROWS = [CORE, *BPB_METRICS] + [m for t in SUMMARY_METRICS[1:] for m in [t] + [f"{t} {f}" for f in FORMS]]
CHANCE = "chance"  # and "<task> chance"
STANDIN = "stand-in"  # a section's key saying that its data was a local stand-in, and which
# on-demand prices per accelerator-hour (USD), for the estimate
HOURLY = {"H100": 3.0, "H200": 3.5, "A100": 1.8, "TPU v5 lite": 1.2, "TPU v5e": 1.2, "TPU v6": 2.7}
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def report_dir() -> str:
    return os.path.join(get_base_dir(), "report")


def _path(section: str) -> str:
    return os.path.join(report_dir(), section.lower().replace(" ", "-") + ".json")


def _load(section: str) -> dict | None:  # a logged section or "header"; None if not logged
    if not os.path.exists(path := _path(section)):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def log(section: str, *data: dict) -> str | None:
    """Record a stage's section (process 0 only); later calls for the same section replace it."""
    if jax.process_index() != 0:
        return None
    os.makedirs(report_dir(), exist_ok=True)
    path = _path(section)
    record = {"section": section, "timestamp": datetime.datetime.now().strftime(TIME_FORMAT),
              "data": [d for d in data if d]}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path


def standin(note: str | None) -> dict:
    """The item a section logs to be labelled a local stand-in in the report ({} when note is None)."""
    return {STANDIN: note} if note else {}


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict:
    """Date, git, hardware, dependency versions and code size, for the header."""
    from importlib.metadata import PackageNotFoundError, version
    versions = {}
    for package in ("jax", "flax", "optax", "orbax-checkpoint", "grain", "tiktoken", "datasets"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "-"
    files = [f for f in _run(["git", "ls-files"]).splitlines()
             if f.endswith((".py", ".md", ".sh", ".html", ".toml")) and os.path.isfile(f)]
    text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)
    devices = jax.devices()
    return {"started": datetime.datetime.now().strftime(TIME_FORMAT),
            "git": {"commit": _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
                    "dirty": bool(_run(["git", "status", "--porcelain"])),
                    "message": _run(["git", "log", "-1", "--pretty=%s"])[:80]},
            "hardware": {"devices": f"{len(devices)} x {devices[0].device_kind}", "platform": devices[0].platform,
                         "processes": jax.process_count(), "cpus": os.cpu_count(), "system": platform.platform()},
            "python": platform.python_version(), "versions": versions,
            "code": {"files": len(files), "lines": text.count("\n"), "characters": len(text),
                     "tokens (approx)": len(text) // 4}}


def reset() -> str | None:
    """Start a new report: the last run's sections and report card move to report/previous/<time>/ (nothing is
    deleted), then the header is written. Returns where the last run's went (None: there was none)."""
    directory = report_dir()
    check_writable(directory, "the report")
    old = [name for name in os.listdir(directory) if name.endswith((".json", ".md", ".png", ".txt"))]
    archive = None
    if old:
        archive = os.path.join(directory, "previous", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        os.makedirs(archive, exist_ok=True)
        for name in old:
            os.replace(os.path.join(directory, name), os.path.join(archive, name))
    with open(_path("header"), "w", encoding="utf-8") as f:
        json.dump(environment(), f, indent=1)
    return archive


def scores_line(stage: str) -> str | None:
    """One line of `stage`'s chat evaluation: each task against its chance level, how many beat it (None: not run)."""
    section = _load(chat_evaluation(stage))
    if section is None:
        return None
    data = {k: v for d in section["data"] for k, v in d.items()}
    tasks = [(t, data[t], data[f"{t} {CHANCE}"]) for t in data if f"{t} {CHANCE}" in data and data[t] is not None]
    if not tasks:
        return None
    above = sum(score > chance for _, score, chance in tasks)
    scores = ", ".join(f"{t} {100 * score:.0f}% (chance {100 * chance:.0f}%)" for t, score, chance in tasks)
    verdict = (f"right more often than chance on {above} of {len(tasks)} tasks" if above else
               "not yet right more often than chance on any task")
    return f"the {stage} model's chat evaluation: {scores}: {verdict}"


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def summary(sections: dict) -> dict:
    """{stage: {metric: value}} of the SUMMARY_ROWS in the evaluation sections (by title)."""
    table = {}
    for stage, (_, *evaluations) in STAGES.items():
        found = {k: v for title in evaluations for item in sections.get(title, {}).get("data", [])
                 for k, v in item.items() if k in SUMMARY_ROWS and v is not None}
        if found:
            table[stage] = found
    return table


def summary_lines(sections: dict, table: dict) -> list[str]:
    """The summary table: a row per metric that has a value, a column per stage."""
    chance = {k[:-len(CHANCE) - 1]: v for section in sections.values() for item in section["data"]
              for k, v in item.items() if k.endswith(" " + CHANCE)}
    lines = ["| metric | chance | " + " | ".join(s.upper() for s in STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
    for m in SUMMARY_ROWS:
        if any(m in row for row in table.values()):
            cells = [chance.get(m, "-")] + [table.get(s, {}).get(m, "-") for s in STAGES]
            lines.append(f"| {m} | " + " | ".join(map(_format, cells)) + " |")
    return lines + [""]


def estimated_cost(hardware: str, hours: float) -> float | None:
    count, _, kind = hardware.partition(" x ")
    rate = next((r for name, r in HOURLY.items() if name in kind), None)
    return None if rate is None or not count.isdigit() else rate * int(count) * hours


def generate() -> str:
    """Write report.md (and the plots) from the header and the logged sections; returns its path."""
    sections = {title: section for title in ORDER if (section := _load(title)) is not None}
    header = _load("header")
    lines = ["# nanochat-jax report card", ""]
    standins = [(section["section"], item[STANDIN]) for section in sections.values() for item in section["data"]
                if item.get(STANDIN)]
    if standins:
        lines += ["> **LOCAL STAND-IN DATA.** Parts of this run used data built on this machine instead of nanochat's "
                  "(no network or no downloaded data): its numbers exercise the pipeline and compare with nothing "
                  "published.", ">"] + [f"> - {name}: {note}" for name, note in standins] + [""]
    if header is None:
        lines += ["(no header: run `python -m scripts.report reset` at the start of a run)", ""]
    else:
        git, hw = header["git"], header["hardware"]
        lines += [f"Run started: {header['started']}", "", "## Environment", "",
                  f"- Commit: {git['commit']} {'(dirty)' if git['dirty'] else '(clean)'}: {git['message']}",
                  f"- Hardware: {hw['devices']} ({hw['platform']}), {hw['processes']} process(es), {hw['cpus']} CPUs,"
                  f" {hw['system']}",
                  f"- Python {header['python']}; " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()),
                  "- Code: " + ", ".join(f"{k} {_format(v)}" for k, v in header["code"].items()), ""]
    for section in sections.values():
        items = [f"- {k}: {_format(v)}" for item in section["data"] for k, v in item.items()]
        lines += [f"## {section['section']}", "", f"timestamp: {section['timestamp']}", "", *items, ""]
    table = summary(sections)
    lines += ["## Summary", ""] + (summary_lines(sections, table) if table else [])
    if header is not None and sections:
        start = datetime.datetime.strptime(header["started"], TIME_FORMAT)
        end = max(datetime.datetime.strptime(s["timestamp"], TIME_FORMAT) for s in sections.values())
        hours = max((end - start).total_seconds(), 0) / 3600
        cost = estimated_cost(header["hardware"]["devices"], hours)
        lines += [f"Total wall clock time: {int(hours)}h{int(hours * 60) % 60:02d}m",
                  f"Estimated cost: ${cost:,.2f} (on-demand prices)" if cost is not None else
                  "Estimated cost: - (no price for this hardware)", ""]
    if plots := make_plots(sections, table):
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    path = os.path.join(report_dir(), "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def make_plots(sections: dict, table: dict) -> list[str]:
    """PNG plots in the report directory (none without matplotlib): each training stage's curves, chat-eval bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(report_dir(), name), dpi=100)
        plt.close(fig)
        names.append(name)

    for stage, (training, *_) in STAGES.items():  # each training run's curves, from the metrics.jsonl it wrote
        runs = [d["checkpoint_dir"] for d in sections.get(training, {}).get("data", []) if "checkpoint_dir" in d]
        if not runs or not os.path.exists(path := os.path.join(runs[0], "metrics.jsonl")):
            continue
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        curves = {key: points for key in ("loss", "reward", "val_bpb", "val_loss", "pass@1")
                  if (points := [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))])}
        if not curves:
            continue
        fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.2), squeeze=False)
        for ax, (key, points) in zip(axes[0], curves.items()):
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
            ax.set(title=f"{stage}: {key}", xlabel="step")
            ax.grid(alpha=0.3)
        save(fig, f"{stage}_curves.png")
    chat = {s: row for s, full in table.items() if (row := {m: v for m, v in full.items() if m != CORE})}
    if chat:
        metrics = [m for m in SUMMARY_METRICS if any(m in row for row in chat.values())]
        fig, ax = plt.subplots(figsize=(1.2 * len(metrics) + 3, 3.2))
        width = 0.8 / len(chat)
        for i, (stage, row) in enumerate(chat.items()):
            ax.bar([j + i * width for j in range(len(metrics))], [row.get(m, 0) for m in metrics], width, label=stage)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics)
        ax.set_ylabel("accuracy")
        ax.legend()
        save(fig, "chat_evals.png")
    return names
