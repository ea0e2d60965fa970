"""The device check, one command on one GPU with random weights (sizes in FULL): the training step at the largest batch
that fits, cuDNN attention against XLA's, the engine against the memory-bandwidth bound, into device_check.json and
device_check.md (a table for docs/benchmarks.md); a failing part is recorded with its error.

    python -m scripts.device_check --out results/          # one H100/H200: about 5 minutes
    python -m scripts.device_check --tiny --out /tmp/dc    # CPU rehearsal: the same code paths at toy sizes
"""
import argparse
import json
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

from nanochat_jax.measure import speed
from nanochat_jax.common import parse_dtype
from nanochat_jax.model.gpt import config_from_depth
from nanochat_jax.model.sharding import make_mesh

FULL = dict(train_depths=(12, 20), modern=((24, False), (24, True)), modern_vocab=32768, seq_len=2048, vocab=65536,
            start_batch=64, steps=5, attention=(4, 2048, 10, 10, 128), engine_depth=20, prompt_len=512,
            batches=(1, 8, 32), decode_tokens=256)
TINY = dict(train_depths=(2,), modern=((2, True),), modern_vocab=512, seq_len=64, vocab=512, start_batch=2, steps=2,
            attention=(2, 64, 2, 1, 32), engine_depth=2, prompt_len=32, batches=(1, 2), decode_tokens=32)


def run_part(name: str, fn) -> dict:
    t0 = time.time()
    try:
        result = fn()
    except Exception as e:  # one failing part must not cost the others the device time
        result = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
    print(f"{name}: {time.time() - t0:.0f}s", flush=True)
    return result


def error_row(part: dict, columns: int) -> list[str]:
    """[the part's error as a table row] if it failed, else []."""
    return [f"| error: {part['error'][:80]} |" + " |" * (columns - 1)] if "error" in part else []


def markdown(results: dict) -> str:
    env, att, eng = results["environment"], results["attention"], results["engine"]
    lines = [f"Device check, {env['date']}: one of {env['devices']} ({env['platform']}), jax {env['jax']}, "
             f"{env['dtype']}, `{env['command']}`", "",
             "| training step | batch x seq | compile | step | tokens/s | MFU | peak: compiler / measured |",
             "|---|---|---|---|---|---|---|"]
    for row in results["train"]:
        label = f"d{row.get('depth', '?')}" + (f" {row['label']}" if row.get("label") else "")
        if "error" in row:
            lines.append(f"| {label} | error: {row['error'][:80]} | | | | | |")
            continue
        # the compiler's peak (aot_compile's, with no GPU) beside the allocator's: a lent GPU checks the method
        measured = "-" if row["device_peak_bytes"] is None else f"{row['device_peak_bytes'] / 2**30:.2f}"
        mfu = "-" if row["mfu_percent"] is None else f"{row['mfu_percent']:.1f}%"
        lines.append(f"| {label} ({row['parameters'] / 1e6:.0f}M) | {row['device_batch_size']} x "
                     f"{row['seq_len']} | {row['compile_s']:.1f} s | {1000 * row['step_s']:.1f} ms | "
                     f"{row['tokens_per_s']:,.0f} | {mfu} | {row['compiled_peak_bytes'] / 2**30:.2f} / {measured} "
                     "GiB |")
    lines += ["", "| attention (forward and gradients) | XLA | cuDNN | largest difference, relative (tolerance) |",
              "|---|---|---|---|", *error_row(att, 4)]
    for row in att.get("windows", []):
        cudnn = "unavailable" if row["cudnn_ms"] is None else f"{row['cudnn_ms']:.2f} ms"
        diff = "-" if row["cudnn_ms"] is None else f"{row['max_rel_diff']:.2e} ({row['tolerance']:.0e})"
        window = "causal" if row["window"] is None else f"window {row['window']}"
        lines.append(f"| {att['shape']} {att['dtype']}, {window} | {row['xla_ms']:.2f} ms | {cudnn} | {diff} |")
    lines += ["", "| engine | prefill | decode tokens/s | ms/step | share of the bandwidth bound |",
              "|---|---|---|---|---|", *error_row(eng, 5)]
    for row in eng.get("decode", []):
        share = "-" if row.get("fraction_of_bound") is None else f"{100 * row['fraction_of_bound']:.0f}%"
        lines.append(f"| d{eng['depth']} batch {row['batch']} | {eng['prefill_ms']:.1f} ms ({eng['prompt_len']} "
                     f"tokens) | {row['tokens_per_s']:,.0f} | {row['ms_per_step']:.2f} | {share} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="measure the training step, attention and the engine on this device")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a rehearsal on CPU")
    p.add_argument("--out", default=".", help="directory for device_check.json and device_check.md")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on GPU/TPU")
    args = p.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    dtype = parse_dtype(args.dtype)
    device = jax.devices()[0]
    command = "python -m scripts.device_check" + (" --tiny" if args.tiny else "")
    env = {"date": time.strftime("%Y-%m-%d"), "devices": f"{jax.device_count()} x {device.device_kind}",
           "platform": device.platform, "jax": jax.__version__, "dtype": jnp.dtype(dtype).name, "command": command}
    results = {"environment": env, "train": []}
    mesh = make_mesh(devices=jax.devices()[:1])  # one device: the numbers are per chip

    def train(name: str, config, batch: int, fp8: bool = False, **label):
        row = run_part(name, lambda: speed.train_step(config, mesh, dtype, batch, steps=sizes["steps"], fp8=fp8))
        results["train"].append(row | {"depth": config.n_layer} | label)

    for depth in sizes["train_depths"]:
        train(f"train d{depth}", config_from_depth(depth, sizes["vocab"], sizes["seq_len"]), sizes["start_batch"])
    for depth, fp8 in sizes["modern"]:  # the modern recipe's step, bf16 and FP8
        label = "modern " + ("fp8" if fp8 else jnp.dtype(dtype).name)
        config = config_from_depth(depth, sizes["modern_vocab"], sizes["seq_len"], recipe="modern")
        train(f"train d{depth} {label}", config, sizes["start_batch"] // 2, fp8, label=label)
    results["attention"] = run_part("attention", lambda: speed.attention_paths(*sizes["attention"], dtype))
    config = config_from_depth(sizes["engine_depth"], sizes["vocab"], sizes["prompt_len"] + sizes["decode_tokens"] + 64)
    results["engine"] = run_part("engine", lambda: {"depth": sizes["engine_depth"]} | speed.engine_speed(
        config, dtype, sizes["prompt_len"], sizes["batches"], sizes["decode_tokens"]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "device_check.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
