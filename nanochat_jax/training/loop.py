"""The one training loop of every stage (base, mid, SFT, RL): steps, evaluations, checkpoints, logging, exact resume.

A batch source: get_state()/set_state() (its position), next_batch(params) -> (this process's arrays, numbers to log);
a checkpoint at step s (after s steps) saves the position of the batch held next. metrics.jsonl: a record a step."""
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import jax

from nanochat_jax.common import print0
from nanochat_jax.data.dataloader import to_global_array
from nanochat_jax.training.optim import Schedule
from nanochat_jax.training.trainer import TrainState, peak_flops_per_device


@dataclass
class Eval:
    every: int  # steps between runs (-1: only at the end); always at the end
    run: Callable  # the model (nnx) -> dict of metrics ({} for one that only prints, such as samples)
    at_start: bool = True  # also at step 0

    def due(self, step: int, last: bool) -> bool:
        return last or (self.every > 0 and step % self.every == 0 and (step > 0 or self.at_start))


def trim_metrics(path: str, before_step: int):
    """On resume, drop the records of steps that will be trained again (and a line cut short by a crash)."""
    if jax.process_index() != 0 or not os.path.exists(path):
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


def run(stage, state: TrainState, batches, num_iterations: int, schedule: Schedule, evals: list[Eval]) -> TrainState:
    """`stage` (a stages.Stage: its trainer, checkpointer, flags, wandb run) trained from `state` to num_iterations."""
    meta = {"model_config": asdict(stage.config), "train_config": vars(stage.args)}  # in every checkpoint's meta
    if (source := stage.source) is not None:
        meta["source"] = {"stage": source.stage, "directory": source.directory, "step": source.step}
    trainer, checkpointer, sharding = stage.trainer, stage.checkpointer, stage.trainer.batch_sharding()
    metrics_path = os.path.join(checkpointer.directory, "metrics.jsonl")
    trim_metrics(metrics_path, state.step)
    peak, flops_per_token, save_every = peak_flops_per_device(), stage.config.flops_per_token(), stage.args.save_every
    start_step, t_start = state.step, time.time()

    def write_metrics(record: dict):
        if jax.process_index() == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if stage.wandb_run is not None:
                stage.wandb_run.log(record)

    def draw():
        """(the position of the batch about to be drawn, the batch as global arrays, its stats); none after the last."""
        position = batches.get_state()
        if state.step >= num_iterations:
            return position, None, {}
        arrays, stats = batches.next_batch(state.params)
        return position, {name: to_global_array(a, sharding) for name, a in arrays.items()}, stats

    position, batch, stats = draw()  # `position`: where the batch held starts, what a checkpoint saves
    pending = None  # the step dispatched last, whose metrics are fetched once the step after it is dispatched
    last_done = time.time()

    def finish(step, out, tokens, lr_mult, trained_stats, record, dispatched):
        """Fetch a dispatched step's metrics (waiting for it), log them: on the host while the next step runs."""
        nonlocal last_done
        loss, grad_norm, num_tokens = float(out["loss"]), float(out["grad_norm"]), int(out["num_tokens"])
        done = time.time()
        dt, last_done = done - max(dispatched, last_done), done  # its own time, not the one before it
        if step > start_step:  # the first step includes compilation
            state.loop.total_time += dt
        tok_per_sec = tokens / dt
        mfu = None if peak is None else 100 * flops_per_token * tok_per_sec / (peak * jax.device_count())
        eta = (done - t_start) / (step + 1 - start_step) * (num_iterations - step - 1)
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * (step + 1) / num_iterations:5.1f}%) | "
               f"loss {loss:.4f} | grad norm {grad_norm:.3f} | lrm {lr_mult:.3f} | dt {dt * 1000:.0f}ms | "
               f"tok/s {tok_per_sec:,.0f} | mfu {'-' if mfu is None else f'{mfu:.1f}%'} | "
               + "".join(f"{k} {v:.3f} | " for k, v in trained_stats.items()) +
               f"elapsed {(done - t_start) / 60:.1f}m | eta {eta / 60:.1f}m")
        write_metrics({"step": step, "loss": loss, "lr": lr_mult, "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu,
                       "grad_norm": grad_norm, "num_tokens": num_tokens, **trained_stats, **record})

    while True:
        step, last = state.step, state.step == num_iterations
        saving = last or (save_every > 0 and step > 0 and step % save_every == 0)
        due = [ev for ev in evals if ev.due(step, last)]
        if pending is not None and (due or saving):  # these need the step before done: log it first
            finish(*pending)
            pending = None
        record = {}
        if due:
            model = trainer.model(state.params)
            for ev in due:  # on every process (the params span them all); they print on process 0
                record |= ev.run(model)
        if record:
            state.loop.last_eval = record
            if "val_bpb" in record:
                state.loop.min_val_bpb = min(v for v in (state.loop.min_val_bpb, record["val_bpb"]) if v is not None)
            print0(f"step {step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in record.items()))
        if saving and step != start_step:  # the step we started from is already saved
            checkpointer.save_training(state, position, meta | state.loop.last_eval)
        if last:
            if record:
                write_metrics({"step": step, **record})
            break

        values = schedule(step)  # (lr multiplier, Muon momentum, Muon weight-decay multiplier)
        dispatched, tokens, trained_stats = time.time(), batch["inputs"].size, stats  # tokens: padding included
        state.params, state.opt_state, out = trainer.run_step(state.params, state.opt_state, batch, *values)
        state.step += 1
        position, batch, stats = draw()  # dispatch is asynchronous: the next batch is made while the step runs
        if pending is not None:
            finish(*pending)
        pending = (step, out, tokens, values[0], trained_stats, record, dispatched)
    checkpointer.wait()
    return state
