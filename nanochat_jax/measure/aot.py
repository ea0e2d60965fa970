"""What the compilers say of a program, with or without its device: topology devices of TPU/GPU targets, memory per
chip and whether it fits, a GPU's kernels read from the optimized HLO, a TPU's step time (`report`), and the memory
check at the start of a training run. scripts/aot_compile.py builds the programs.
"""
import os
import re
from pathlib import Path

import jax

from nanochat_jax.common import DoesNotFit, compile_timed, print0  # noqa: F401 (aot.DoesNotFit, aot.compile_timed)

# per chip: bf16 dense peak FLOP/s, HBM bandwidth (bytes/s), HBM bytes; keys are device_kind prefixes. v5e: the
# 15.75 GiB its compiler says are available of the 16 GiB
V5E, V5P, V6E = (197e12, 819e9, 15.75 * 2**30), (459e12, 2765e9, 95 * 2**30), (918e12, 1640e9, 32 * 2**30)
CHIPS = {"TPU v5 lite": V5E, "TPU v5e": V5E, "TPU v5p": V5P, "TPU v5": V5P, "TPU v6 lite": V6E, "TPU v6e": V6E,
         "H100": (989e12, 3.35e12, 80e9), "H200": (989e12, 4.8e12, 141e9), "A100": (312e12, 2.0e12, 80e9)}


def chip_specs(device) -> tuple | None:
    """(peak FLOP/s, HBM bytes/s, HBM bytes) of a device, None where unknown (CPU)."""
    kind = device.device_kind
    return next((spec for name, spec in CHIPS.items() if kind.startswith(name) or name in kind), None)


# GPUs the GPU compiler can target without one: name -> (device_memory_size, memory bandwidth B/s, the name a real
# device reports), the facts of XLA's GpuTargetConfigProto that differ between them
GPUS = {"h100": (84942979072, 3352320000000, "NVIDIA H100 80GB HBM3"),
        "h200": (151397597184, 4800000000000, "NVIDIA H200 141GB HBM3e")}


def _env_number(name: str, default: float | None, expected: str) -> float | None:
    """$name as a float (default when unset or empty); SystemExit naming `expected` when it is not a number."""
    text = os.environ.get(name, "")
    try:
        return float(text) if text else default
    except ValueError:
        raise SystemExit(f"{name}={text!r}: expected {expected}") from None


def gpu_memory_fraction() -> float:
    """The share of a GPU's memory JAX's allocator takes: $XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75."""
    return _env_number("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75, "a fraction such as 0.9")


def gpu_target_config(name: str) -> str:
    """A GpuTargetConfigProto (text) for an H100 SXM or H200: Hopper, 132 SMs, its memory, cuDNN 9."""
    memory, bandwidth, description = GPUS[name]
    info = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
                shared_memory_per_core=233472, threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
                block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535,
                memory_bandwidth=bandwidth, l2_cache_size=50 * 2**20, clock_rate_ghz=1.98,
                device_memory_size=memory, shared_memory_per_block_optin=232448, registers_per_core_limit=65536,
                registers_per_block_limit=65536)
    fields = "\n".join(f"  {key}: {value}" for key, value in info.items())
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n"
            f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 10 patch: 0 }}\n'
            f'device_description_str: "{description}"\n')


def device_memory_bytes(device) -> int | None:
    """The memory a program may use on a device: $NANOCHAT_DEVICE_MEMORY (GiB) when set, else what its allocator
    holds (on a GPU JAX's share), else that share of a topology GPU's memory or a TPU's HBM; None on a CPU."""
    gib = _env_number("NANOCHAT_DEVICE_MEMORY", None, "GiB, e.g. 70")
    if gib is not None:
        return int(gib * 2**30)
    try:
        stats = device.memory_stats()
    except Exception:  # topology devices and some backends have none
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if (gpu := next((size for size, _, kind in GPUS.values() if kind == device.device_kind), None)) is not None:
        return int(gpu * gpu_memory_fraction())
    spec = chip_specs(device)
    return None if spec is None else spec[2]


def topology_devices(name: str, target_config: str | None = None):
    """A topology's devices from its compiler, with no such device here: a TPU's ('v5e:2x4') or GPUS' ('h100:8',
    'h100:2x8': 2 hosts of 8); target_config: a GpuTargetConfigProto's text, not gpu_target_config's."""
    from jax.experimental import topologies
    gpu, _, shape = name.partition(":")
    if gpu in GPUS:
        hosts, _, per_host = shape.rpartition("x")
        if not per_host.isdigit() or not (hosts or "1").isdigit():
            raise SystemExit(f"GPU topology {name!r}: expected {gpu}:<GPUs> or {gpu}:<hosts>x<GPUs per host>")
        try:
            config = target_config or gpu_target_config(gpu)
            return topologies.get_topology_desc(platform="cuda", topology_name=gpu, target_config=config,
                                                topology=f"1x{hosts or 1}x{per_host}").devices
        except Exception as e:
            raise SystemExit(f"cannot make GPU topology {name!r} ({str(e).splitlines()[0][:300]}); it needs XLA's GPU "
                             "compiler: pip install 'jax[cuda12]' (in its own virtual environment) and "
                             "JAX_PLATFORMS=cpu in the environment on a machine without a GPU") from None
    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    except Exception as e:
        raise SystemExit(f"cannot make TPU topology {name!r} ({e}); it needs libtpu: pip install 'jax[tpu]' "
                         "(in its own virtual environment on a machine without a TPU)") from None


def cost_analysis(compiled) -> dict:
    """The compiled program's cost analysis as one dict ("flops", "bytes accessed", "optimal_seconds" ...)."""
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def estimates_time(device) -> bool:
    """Whether report() estimates a step time: on a known TPU. A GPU compiled without one has no cost analysis, and
    XLA's would see neither cuDNN's work nor the kernels' real speed (device_check measures it instead)."""
    return device.platform != "gpu" and chip_specs(device) is not None


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {f"{part}_bytes": getattr(m, f"{part}_size_in_bytes") for part in ("argument", "temp", "output", "alias")}
    # arguments and outputs live together except where donated buffers alias
    live = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out | {"peak_bytes": int(max(getattr(m, "peak_memory_in_bytes", 0) or 0, live))}


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(\([^=]*?\)|\S+)\s+([\w-]+)\(([^)]*)\)(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")
FP8_TYPES = ("f8e4m3fn", "f8e5m2")


def _computations(hlo_text: str) -> dict:
    """The optimized HLO text's computations: name -> {instruction name: (type, opcode, operand names, rest)}."""
    comps, current = {}, None
    for line in hlo_text.splitlines():
        if current is None:
            if m := _COMPUTATION.match(line):
                current = comps.setdefault(m.group(1), {})
        elif line.strip() == "}":
            current = None
        elif m := _INSTRUCTION.match(line):
            name, type_, opcode, operands, rest = m.groups()
            current[name] = (type_, opcode, re.findall(r"%([\w.-]+)", operands), rest)
    return comps


def hlo_kernels(hlo_text: str) -> dict:
    """The optimized HLO's matmuls (GEMM fusions, cuBLAS calls, dots; a loop body once), those with float8 operands,
    cuDNN attention calls forward and backward and their masks (a window of w + 1 keys: nanochat's w and the query)."""
    comps = _computations(hlo_text)
    called = lambda rest: re.findall(r"calls=%([\w.-]+)", rest)  # noqa: E731
    inside, grow = set(), [c for body in comps.values() for ins in body.values() if ins[1] == "fusion"
                           for c in called(ins[3])]
    while grow:  # computations called from inside a fusion are inside it too
        if (name := grow.pop()) not in inside:
            inside.add(name)
            grow += [c for ins in comps.get(name, {}).values() for c in called(ins[3])]

    def dot_in(comp_name):  # (computation, dot instruction) of the first dot in a fusion, searching nested calls
        body = comps.get(comp_name, {})
        for ins in body.values():
            if ins[1] == "dot":
                return body, ins
        return next((found for ins in body.values() for c in called(ins[3]) if (found := dot_in(c))), None)

    is_fp8 = lambda body, operands: any(t in body.get(o, ("",))[0] for o in operands for t in FP8_TYPES)  # noqa: E731
    counts = {"matmuls": 0, "fp8_matmuls": 0, "cudnn_attention_calls": 0, "cudnn_attention_backward_calls": 0}
    masks = set()
    for body in [b for comp_name, b in comps.items() if comp_name not in inside]:
        for type_, opcode, operands, rest in body.values():
            target = (re.findall(r'custom_call_target="([^"]+)"', rest) or [""])[0]
            if target.startswith("__cudnn$fmha"):
                backward = "Backward" in target
                counts["cudnn_attention_backward_calls" if backward else "cudnn_attention_calls"] += 1
                mask = re.search(r'"mask_type":\s*"(\w+)"', rest)
                window = re.search(r'"sliding_window_length":\s*"?(\d+)', rest)
                masks.add(f"{'backward' if backward else 'forward'} {mask.group(1) if mask else '?'}"
                          + (f" window {window.group(1)}" if window and int(window.group(1)) else ""))
                continue
            fp8 = None
            if opcode == "dot" or target.startswith("__cublas"):
                fp8 = is_fp8(body, operands) or target.endswith("$f8")
            elif opcode == "fusion" and (found := next((f for c in called(rest) if (f := dot_in(c))), None)):
                fp8 = is_fp8(found[0], found[1][2])
            if fp8 is not None:
                counts["matmuls"] += 1
                counts["fp8_matmuls"] += bool(fp8)
    return {**counts, "cudnn_attention_masks": sorted(masks)}


def refused_bytes(message: str) -> int | None:
    """The bytes a RESOURCE_EXHAUSTED message says the program needs ('... temporaries (40.07G) exceeds ...')."""
    m = re.search(r"\(([\d.]+)([KMGT])\) exceeds", message)
    return None if m is None else int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2)))


def report(compiled, device, compile_s: float, model_flops: float, n_chips: int, roofline_cost: dict | None = None,
           repeat: int = 1, hlo_path: str | None = None) -> dict:
    """The JSON-able facts of one compiled step: memory per chip, fit, a GPU's kernels, and on a TPU a step time: XLA's
    optimal_seconds x repeat (runs per step) where positive, else a roofline, max(FLOPs / peak FLOP/s, bytes / HBM
    bandwidth) per chip, of roofline_cost (per-chip {"flops", "bytes"}, where the program's counts are short: loops)."""
    hbm = device_memory_bytes(device)
    out = {"compile_s": round(compile_s, 1), **memory(compiled), "hbm_bytes": hbm}
    if device.platform == "gpu" and not os.environ.get("NANOCHAT_DEVICE_MEMORY"):
        out["memory_fraction"] = gpu_memory_fraction()
    out["fits"] = None if hbm is None else out["peak_bytes"] <= hbm
    if hbm:
        out["headroom"] = round(1 - out["peak_bytes"] / hbm, 3)
    if device.platform == "gpu":
        out.update(hlo_kernels(compiled.as_text()))
    if hlo_path:
        Path(hlo_path).parent.mkdir(parents=True, exist_ok=True)
        Path(hlo_path).write_text(compiled.as_text())
    out["model_flops_per_step"] = model_flops
    if not estimates_time(device):
        why = ("none for a GPU compiled without one: python -m scripts.device_check measures it"
               if device.platform == "gpu" else "no estimate for this device")
        return out | {"estimated_step_s": None, "estimated_mfu": None, "estimate_from": why}
    cost, spec = cost_analysis(compiled), chip_specs(device)
    optimal = float(cost.get("optimal_seconds", -1.0) or -1.0)
    if optimal > 0 and roofline_cost is None:
        out["estimated_step_s"], out["estimate_from"] = optimal * repeat, "compiler (optimal_seconds)"
    else:
        flops = roofline_cost["flops"] if roofline_cost else float(cost.get("flops", 0.0)) * repeat
        nbytes = roofline_cost["bytes"] if roofline_cost else float(cost.get("bytes accessed", 0.0)) * repeat
        out["estimated_step_s"] = max(flops / spec[0], nbytes / spec[1])
        why = ("it counts loop bodies once" if roofline_cost else "not positive")
        out["estimate_from"] = (f"roofline ({'compute' if flops / spec[0] >= nbytes / spec[1] else 'memory'} bound; "
                                f"the compiler's optimal_seconds, {optimal:.3g}, is not usable: {why})")
        out["roofline_flops_per_chip"], out["roofline_bytes_per_chip"] = flops, nbytes
    step_s = out["estimated_step_s"]
    out["estimated_mfu"] = None if not step_s else round(100 * model_flops / (step_s * n_chips * spec[0]), 1)
    return out


def largest_fitting(fits_at, start: int) -> int | None:
    """The largest power-of-two device batch <= start for which fits_at(batch) is true (halving from start)."""
    batch = 1 << (start.bit_length() - 1)
    while batch and not fits_at(batch):
        batch //= 2
    return batch or None


def check_training_memory(trainer, device_batch_size: int, seq_len: int, accum: int) -> dict:
    """At the start of a training run: compile its step (the run then uses that executable), print the memory per
    device, and refuse with SystemExit, naming the largest device batch that fits, when the step does not fit."""
    n, device = jax.device_count(), jax.devices()[0]
    limit = device_memory_bytes(device)
    try:
        compiled, seconds = trainer.compile_step(device_batch_size * n, seq_len, accum)
        mem = memory(compiled)
        fits = limit is None or mem["peak_bytes"] <= limit
    except DoesNotFit as e:
        mem, seconds, fits = {"peak_bytes": refused_bytes(str(e)) or 0}, 0.0, False
    of = "" if limit is None else f" of {limit / 2**30:.2f} GiB"
    if limit is not None and device.platform == "gpu" and not os.environ.get("NANOCHAT_DEVICE_MEMORY"):
        of += " (JAX's share of the GPU: XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)"  # as aot_compile's fits
    print0(f"memory per device: {mem['peak_bytes'] / 2**30:.2f} GiB{of} at --device-batch-size {device_batch_size} "
           + (f"(arguments {mem['argument_bytes'] / 2**30:.2f}, temporaries {mem['temp_bytes'] / 2**30:.2f} GiB; "
              f"compiled in {seconds:.0f}s)" if "temp_bytes" in mem else "(refused by the compiler)"))
    if fits:
        return mem

    def fits_at(rows_per_device):
        try:
            exe, _ = compile_timed(trainer.step, *trainer.step_args(rows_per_device * n, seq_len, 1))
        except DoesNotFit:
            return False
        return memory(exe)["peak_bytes"] <= limit

    best = largest_fitting(fits_at, device_batch_size // 2) if device_batch_size > 1 else None
    advice = (f"the largest that fits is --device-batch-size {best} (gradient accumulation keeps the tokens per "
              "step)" if best else "not even one row per device fits: use a larger mesh, --remat full or a smaller "
              "model")
    raise SystemExit(f"this run does not fit: the training step needs {mem['peak_bytes'] / 2**30:.2f} GiB per device"
                     f"{of}; {advice}")
