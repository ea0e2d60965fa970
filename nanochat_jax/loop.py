"""The training loop shared by base, mid and SFT training: steps, schedules, periodic evaluation, sampling and
checkpoints, logging to the console, metrics.jsonl and (optionally) wandb, and exact resume.

A stage supplies the Trainer, the starting state, a batch iterator with get_state/set_state whose next() is one
step's batch (a dict of this process's arrays with a leading micro-step axis, see Trainer.step), and its evaluations.
Step s (0-based) trains on the s-th batch; "checkpoint at step s" means after s steps. metrics.jsonl holds one JSON
object per trained step ({"step", "loss", "lr", "tok_per_sec", "mfu", "grad_norm", "num_tokens"}, plus the evaluation
results on evaluated steps) and a final {"step": num_iterations, ...evaluations} line.
"""
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.checkpoint import Checkpointer
from nanochat_jax.common import print0
from nanochat_jax.dataloader import to_global_array
from nanochat_jax.trainer import Trainer, peak_flops_per_device


@dataclass
class Eval:
    every: int  # steps between runs (-1: only at the end); always at the end
    run: Callable  # params -> dict of metrics
    at_start: bool = True  # also at step 0


@dataclass
class LoopConfig:
    num_iterations: int
    flops_per_token: float
    schedule: Callable[[int], tuple[float, float]]  # step -> (lr multiplier, muon momentum)
    evals: list[Eval] = field(default_factory=list)
    save_every: int = -1  # -1: only at the end
    sample_every: int = -1
    sample: Callable | None = None  # params -> None (prints samples)
    meta: Callable[[int, dict], dict] = field(default=lambda step, loop_state: {})
    wandb_run: object = None


def due(step: int, every: int) -> bool:
    return every > 0 and step > 0 and step % every == 0


def trim_metrics(path: str, before_step: int):
    """On resume, drop the records of steps that will be trained again (and a line cut short by a crash)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] < before_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                print0(f"{path}: skipping an unreadable line {line[:60]!r}")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def gather_json(obj) -> list:
    """Every process's `obj` (JSON-serialisable), in process order: each host's data-loader state is its own."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


def run(trainer: Trainer, params, opt_state, batches, cfg: LoopConfig, checkpointer: Checkpointer,
        start_step: int = 0, loop_state: dict | None = None):
    """Trains from start_step to cfg.num_iterations; returns (params, opt_state, loop_state)."""
    loop_state = loop_state or {"min_val_bpb": None, "total_time": 0.0, "last_eval": {}}
    metrics_path = os.path.join(checkpointer.directory, "metrics.jsonl")
    if jax.process_index() == 0:
        trim_metrics(metrics_path, start_step)
    peak = peak_flops_per_device()
    batch_sharding = trainer.batch_sharding()

    def next_batch():
        return {name: to_global_array(array, batch_sharding) for name, array in next(batches).items()}

    data_state = batches.get_state()  # the loader's state after the batches of the steps done so far
    batch = next_batch()
    step, t_start = start_step, time.time()
    while True:
        last = step == cfg.num_iterations
        record = {}
        for ev in cfg.evals:
            if last or (ev.every > 0 and step % ev.every == 0 and (step > 0 or ev.at_start)):
                record |= ev.run(params)
        if record:
            loop_state["last_eval"] = record
            if "val_bpb" in record:
                best = loop_state["min_val_bpb"]
                loop_state["min_val_bpb"] = record["val_bpb"] if best is None else min(best, record["val_bpb"])
            print0(f"step {step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in record.items()))
        if cfg.sample is not None and (last or due(step, cfg.sample_every)):
            cfg.sample(params)  # on every process (the params span them all); it prints on process 0
        if (last or due(step, cfg.save_every)) and step != start_step:
            checkpointer.save(step, {"params": params, "opt_state": opt_state},
                              cfg.meta(step, dict(loop_state, data_states=gather_json(data_state))))
        if last:
            if record:
                write_metrics(metrics_path, {"step": step, **record}, cfg.wandb_run)
            break

        lr_mult, momentum = cfg.schedule(step)
        tokens = batch["inputs"].size  # processed, padding included
        t0 = time.time()
        params, opt_state, out = trainer.run_step(params, opt_state, batch, lr_mult, momentum)
        data_state = batches.get_state()
        batch = next_batch()  # host work overlaps the device's step
        loss, grad_norm, num_tokens = float(out["loss"]), float(out["grad_norm"]), int(out["num_tokens"])
        dt = time.time() - t0
        if step > start_step:  # the first step includes compilation
            loop_state["total_time"] += dt
        tok_per_sec = tokens / dt
        mfu = None if peak is None else 100 * cfg.flops_per_token * tok_per_sec / (peak * jax.device_count())
        done = step + 1 - start_step
        eta = (time.time() - t_start) / done * (cfg.num_iterations - step - 1)
        print0(f"step {step:05d}/{cfg.num_iterations:05d} ({100 * (step + 1) / cfg.num_iterations:5.1f}%) | "
               f"loss {loss:.4f} | grad norm {grad_norm:.3f} | lrm {lr_mult:.3f} | dt {dt * 1000:.0f}ms | "
               f"tok/s {tok_per_sec:,.0f} | mfu {'-' if mfu is None else f'{mfu:.1f}%'} | "
               f"elapsed {(time.time() - t_start) / 60:.1f}m | eta {eta / 60:.1f}m")
        write_metrics(metrics_path, {"step": step, "loss": loss, "lr": lr_mult, "tok_per_sec": tok_per_sec,
                                     "mfu": mfu, "grad_norm": grad_norm, "num_tokens": num_tokens, **record}, cfg.wandb_run)
        step += 1
    checkpointer.wait()
    return params, opt_state, loop_state


def write_metrics(path: str, record: dict, wandb_run=None):
    if jax.process_index() != 0:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if wandb_run is not None:
        wandb_run.log(record)


def eval_sums(trainer: Trainer, params, batches, num_batches: int, token_bytes) -> dict:
    """Summed loss, counted targets, bpb nats and bytes (Trainer.eval_sums) over num_batches batches
    ({"inputs", "targets"} [rows, T], this process's rows) from a fresh iterator."""
    token_bytes = jnp.asarray(token_bytes)
    totals = {}
    for _ in range(num_batches):
        micro = next(batches)
        batch = {name: to_global_array(micro[name], trainer.rows_sharding()) for name in ("inputs", "targets")}
        for name, value in trainer.eval_sums(params, batch, token_bytes).items():
            totals[name] = totals.get(name, 0) + value.item()
    return totals


def bits_per_byte(sums: dict) -> float:
    return float("inf") if sums["bytes"] == 0 else sums["bpb_nats"] / (np.log(2) * sums["bytes"])

