"""Compile the training step (with its optimizer) and the engine's prefill and decode for a device topology from
abstract shapes, with no device: memory per chip and whether it fits (a GPU: in its XLA_PYTHON_CLIENT_MEM_FRACTION),
a TPU's step time and MFU, a GPU's kernels. Topologies: v5e:2x4, v5e:4x4, v5p:2x2x1, v6e:2x4, h100:8, h100:2x8, h200:8.

    python -m scripts.aot_compile --topology v5e:4x4 --depth 32 --mesh fsdp:16 --find-max-batch --json-out d32.json
    JAX_PLATFORMS=cpu python -m scripts.aot_compile --topology h100:8 --recipe modern --depth 24 --fp8 --hlo-out hlo/
"""
import argparse
import dataclasses
import json
import os
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax.measure import aot
from nanochat_jax.inference.programs import DecodeState, decode, prefill
from nanochat_jax.model.gpt import GPT, REMAT_POLICIES, config_from_depth, init_cache
from nanochat_jax.recipes import RECIPES
from nanochat_jax.training.optim import auto_batch, build_optimizer
from nanochat_jax.model.sharding import make_mesh
from nanochat_jax.training.trainer import Trainer

PROGRAMS = ("train", "prefill", "decode")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="compile nanochat-jax's jitted programs ahead of time")
    p.add_argument("--topology", default=None, help="e.g. v5e:2x4, h100:8, h100:2x8 (default: this machine's devices)")
    p.add_argument("--target-config", default=None, help="a GPU's GpuTargetConfigProto text file, not the built-in "
                   "H100/H200 one (e.g. the *.gpu_target_config.pbtxt of XLA_FLAGS=--xla_dump_to on a GPU)")
    p.add_argument("--recipe", choices=RECIPES, default="classic")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the recipe's (classic 65536, modern 32768)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--mesh", default=None, help="e.g. fsdp:8, data:2,fsdp:4 (default: every device on data)")
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per chip per micro-step")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step (default: classic "
                   "524288; modern: from the horizon at the speedrun's data:param ratio 8, as train.base sizes it)")
    p.add_argument("--remat", choices=sorted(REMAT_POLICIES), default="none")
    p.add_argument("--fp8", action="store_true", help="FP8 matmuls in the training step (the modern recipe's --fp8)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--programs", default="train,prefill,decode", help=f"comma-separated, of {PROGRAMS}")
    p.add_argument("--decode-batch", type=int, default=8, help="rows of the engine's decode step")
    p.add_argument("--find-max-batch", action="store_true", help="also find the largest device batch that fits")
    p.add_argument("--json-out", default=None)
    p.add_argument("--hlo-out", default=None, help="directory for each program's optimized HLO (<program>.hlo.txt)")
    args = p.parse_args(argv)
    args.programs = [name.strip() for name in args.programs.split(",") if name.strip()]
    if bad := [name for name in args.programs if name not in PROGRAMS]:
        p.error(f"unknown --programs {bad}: expected some of {PROGRAMS}")
    if args.vocab_size is None:
        args.vocab_size = RECIPES[args.recipe].vocab_size
    if args.total_batch_size is None and args.recipe == "classic":
        args.total_batch_size = 524288
    elif args.total_batch_size is None:  # as train.base sizes it: from the horizon at the speedrun's data:param ratio 8
        params = [config_from_depth(d, args.vocab_size, args.seq_len, recipe="modern").scaling_params()
                  for d in (args.depth, 12)]
        args.total_batch_size = auto_batch(*params, 8.0, 0.0)[0]
    for name in ("depth", "seq_len", "device_batch_size", "total_batch_size", "decode_batch", "vocab_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def program_report(args, devices, name: str, compile_at, model_flops: float, repeat: int, estimate: bool = True,
                   kernel_flops: float = 0.0, min_flops: float | None = None) -> dict:
    """aot.report of compile_at(layers=--depth); estimate: a TPU's step time. XLA counts a loop's body (the layers,
    micro-steps, decode steps) once, so its cost is scaled from 0- and 1-layer probes: repeat x (cost(0) + L x (cost(1)
    - cost(0))) (the optimizer update, in each, makes it an overestimate) + kernel_flops (splash attention: a Pallas
    kernel the cost model cannot see); a probe may merge a recomputed forward away, so the FLOPs are >= min_flops."""
    compiled, seconds = compile_at(args.depth)
    roofline = None
    if estimate and aot.estimates_time(devices[0]):  # (none to make for a CPU or a GPU)
        c0, c1 = ({"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}
                  for cost in (aot.cost_analysis(compile_at(layers, probe=True)[0]) for layers in (0, 1)))
        roofline = {"flops": repeat * (c0["flops"] + args.depth * (c1["flops"] - c0["flops"])) + kernel_flops,
                    "bytes": repeat * (c0["bytes"] + args.depth * (c1["bytes"] - c0["bytes"]))}
        if min_flops is not None:
            roofline["flops"] = max(roofline["flops"], min_flops)
    return aot.report(compiled, devices[0], seconds, model_flops, len(devices), roofline, repeat,
                      hlo_path=args.hlo_out and os.path.join(args.hlo_out, f"{name}.hlo.txt"))


def train_program(args, config, devices, mesh, rows_per_chip: int, estimate: bool = True) -> dict:
    """Trainer.step compiled for one micro-step of rows_per_chip rows a chip (the scan over micro-steps holds one at a
    time: memory does not depend on the accumulation), or why the compiler refused it."""
    dtype, n_chips = jnp.dtype(args.dtype), len(devices)
    tokens_per_micro = rows_per_chip * n_chips * args.seq_len
    if args.total_batch_size % tokens_per_micro:
        raise SystemExit(f"--total-batch-size {args.total_batch_size} is not a multiple of {rows_per_chip} rows x "
                         f"{n_chips} chips x {args.seq_len} tokens")
    accum = args.total_batch_size // tokens_per_micro

    def compile_step(layers, probe=False):  # (a probe is the same step)
        cfg = dataclasses.replace(config, n_layer=layers)
        make = lambda: GPT(cfg, rngs=nnx.Rngs(0), dtype=dtype, remat=args.remat, fp8=args.fp8)  # noqa: E731
        grad_clip = RECIPES[cfg.recipe].optimizer["grad_clip"]
        trainer = Trainer.create(make, build_optimizer(cfg.n_embd, recipe=cfg.recipe, grad_clip=grad_clip), mesh)
        return aot.compile_timed(trainer.step, *trainer.step_args(rows_per_chip * n_chips, args.seq_len))

    platform, chip_tokens, full = devices[0].platform, args.total_batch_size / n_chips, args.remat == "full"
    kernel = ("splash" if platform == "tpu" and args.seq_len % 128 == 0
              else "cudnn" if platform == "gpu" and dtype == jnp.bfloat16 else None)
    # attention's forward FLOPs per token, 4 N D min(window, T) a layer: 3 times in training, 4 under remat full
    attention = sum(4 * config.n_head * config.head_dim * min(w or config.sequence_len, config.sequence_len)
                    for w in config.window_sizes())
    # at least the model's count, the head's forward again in the backward (chunked loss), under remat full the blocks'
    head, blocks = 2 * config.padded_vocab_size * config.n_embd, 2 * config.param_counts()["transformer_matrices"]
    least = (config.flops_per_token() + head + (blocks + attention if full else 0)) * chip_tokens
    splash = attention * (3 + full) * chip_tokens if kernel == "splash" else 0.0
    name = "train" if rows_per_chip == args.device_batch_size else f"train_{rows_per_chip}rows"
    try:
        out = program_report(args, devices, name, compile_step, config.flops_per_token() * args.total_batch_size,
                             accum, estimate, kernel_flops=splash, min_flops=least)
    except aot.DoesNotFit as e:
        return {"device_batch_size": rows_per_chip, "fits": False, "error": str(e),
                "needed_bytes": aot.refused_bytes(str(e))}
    return {"device_batch_size": rows_per_chip, "grad_accum_steps": accum, "attention": kernel or "xla", **out}


def engine_programs(args, config, devices) -> dict:
    """The engine's prefill (one seq_len prompt) and decode (16 tokens, --decode-batch rows) on one chip, as served."""
    dtype, n = jnp.dtype(args.dtype), args.decode_batch
    one = jax.sharding.NamedSharding(make_mesh("data:1", devices=devices[:1]), jax.sharding.PartitionSpec())
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=one)  # noqa: E731
    abstract = lambda tree: jax.tree.map(lambda s: spec(s.shape, s.dtype), tree)  # noqa: E731
    cache_len = -(-(config.sequence_len + 1) // 256) * 256

    def compile_program(name, layers, probe=False):  # a probe decodes 1 step, not 16
        cfg = dataclasses.replace(config, n_layer=layers)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0), dtype=dtype)))
        params = abstract(state)
        if name == "prefill":
            fn = jax.jit(partial(prefill, graphdef), static_argnames="cache_len")
            return aot.compile_timed(fn, params, spec((1, cfg.sequence_len), jnp.int32), spec((), jnp.int32),
                                     cache_len=cache_len)  # (the first tokens' sampler is a small program apart)
        cache = abstract(jax.eval_shape(lambda: init_cache(cfg, n, cache_len, dtype)))
        rows = jax.eval_shape(lambda: DecodeState.new(jnp.zeros(n, jnp.int32), 1, 1,
                                                      jax.random.split(jax.random.key(0), n), 1.0, 0, 1.0,
                                                      jnp.zeros(2, jnp.int32), cfg.vocab_size))
        fn = jax.jit(partial(decode, graphdef), donate_argnums=(1,), static_argnames="steps")
        return aot.compile_timed(fn, params, abstract(rows).replace(cache=cache), spec((3,), jnp.int32),
                                 steps=1 if probe else 16)

    matmul_flops = 2 * sum(config.param_counts()[key] for key in ("transformer_matrices", "lm_head"))
    results = {}
    for name, tokens, steps in (("prefill", config.sequence_len, 1), ("decode", n * 16, 16)):
        if name in args.programs:
            results[name] = program_report(args, devices[:1], name, partial(compile_program, name),
                                           matmul_flops * tokens, steps)
            results[name]["tokens"] = tokens
    return results


def main(argv=None):
    args = parse_args(argv)
    target_config = args.target_config and Path(args.target_config).read_text()
    devices = aot.topology_devices(args.topology, target_config) if args.topology else jax.devices()
    config = config_from_depth(args.depth, args.vocab_size, args.seq_len, recipe=args.recipe)
    mesh = make_mesh(args.mesh, devices=devices)
    result = {"topology": args.topology or f"local {jax.default_backend()}", "chips": len(devices),
              "hosts": len({d.process_index for d in devices}), "device_kind": devices[0].device_kind,
              "mesh": dict(mesh.shape), "recipe": args.recipe, "depth": args.depth, "parameters": config.num_params(),
              "total_batch_size": args.total_batch_size, "seq_len": args.seq_len, "remat": args.remat,
              "dtype": args.dtype, "fp8": args.fp8, "jax": jax.__version__}
    train_at = partial(train_program, args, config, devices, mesh)
    if "train" in args.programs:
        result["train"] = train = train_at(args.device_batch_size)
        if args.find_max_batch and train["fits"] is not None:
            reports = {args.device_batch_size: train}

            def fits_at(rows):
                reports[rows] = train_at(rows, estimate=False)
                return reports[rows]["fits"]

            if train["fits"]:  # double while a step still takes at least one micro-batch
                best = args.device_batch_size
                while args.total_batch_size % (2 * best * len(devices) * args.seq_len) == 0 and fits_at(2 * best):
                    best *= 2
            else:
                best = aot.largest_fitting(fits_at, args.device_batch_size // 2 or 1)
            train["largest_fitting_device_batch"] = best
            train["peak_bytes_by_device_batch"] = {rows: r["peak_bytes"] for rows, r in sorted(reports.items())
                                                   if "error" not in r}
            if best is not None and best != args.device_batch_size:  # (compiled again, with its estimate)
                result["train_at_largest_fitting_batch"] = train_at(best)
    result.update(engine_programs(args, config, devices))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
