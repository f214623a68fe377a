"""`revjepa bench`: training, evaluation, data and memory figures of this machine.

A thin driver. Every training figure is a real run: `train.setup_run` builds it from a run
configuration (the bench's size, precision, compile variant and `--cpu_kernels`), and its
`Trainer` takes the steps (`Trainer.train_one_step`: the trainer's batches, learning rate,
`train_step` and FLOPs accounting), so a change to the model or the trainer shows up here.
The bench times those steps in repeats, and sets them against the measured throughput of one
large square matmul in the same precision (`flops.matmul_rates`): that ratio is the headline
figure (how much of the machine's matmul speed the training step turns into useful work).
FLOPs and tokens per step are the model family's own estimate (`step_cost`, as in the log's
MFU).

Every timed figure is the median of `repeats` timed repeats, each of several steps, after a
warm-up. On a machine with CUDA the GPU figures come first (bench and table). float32 and
bf16 CPU training repeats are interleaved (same batches, same machine load) and the bf16
speed-up is the median of the per-repeat ratios. CPU training is measured twice: the default
step, then, where the C kernels build here, the step of `--cpu_kernels on` (its fused ops and
its glibc malloc settings, which are process-wide: so they come after every figure of the
default step, and their speed-up over it is a ratio of medians, not paired). The machine may
be shared: each training figure carries its CPU share (process CPU seconds / (wall seconds x
torch threads), ~1 on an idle machine) and the best repeat besides the median, the load
average before and after is recorded, and the table warns when the CPU share says other work
took the cores.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, resolve_config
from .cpu import KernelsUnavailable, kernels, uses_cpu_kernels
from .cpu.hostmem import tune_glibc_malloc
from .data import KIND_ID, Dataset, GenConfig, Split, generate, load_dataset, write_generated
from .distributed import Dist
from .errors import UserError, one_line
from .evaluate import evaluate_split
from .families import build_model
from .flops import batch_shape, matmul_rates
from .step import cpu_has_bf16, resolve_precision
from .train import Preemption, Trainer, close_logging, setup_run

# ----------------------------------------------------------------------------- sizes

# How a training step runs: eager; torch.compile (the device half of the family, static
# shapes); torch.compile + CUDA graphs (what the trainer uses on one GPU).
STEP_VARIANTS = ("eager", "compiled", "graphs")
BUSY_CPU_SHARE = 0.9  # below this CPU share of the timed training the table warns


@dataclass(frozen=True)
class ModelSize:
    n_layer: int
    n_embd: int
    n_head: int
    batch_size: int


@dataclass(frozen=True)
class BenchSizes:
    gen: GenConfig
    cpu_model: ModelSize  # trained in fp32 and bf16 on the CPU, also the evaluated model
    gpu_model: ModelSize  # the seed's configuration, bf16, only when CUDA is available
    eval_batch_size: int
    warmup_steps: int  # untimed training steps before the timed repeats
    steps_per_repeat: int  # training steps per timed repeat
    gpu_warmup_steps: int
    gpu_steps_per_repeat: int
    matmul_n: int  # square matmul size on the CPU
    matmul_iters: int  # matmuls per timed repeat
    gpu_matmul_n: int
    eval_repeats: int  # at most this many timed evaluation passes (one pass is ~12 s in full)


FULL = BenchSizes(
    gen=GenConfig(),
    cpu_model=ModelSize(n_layer=2, n_embd=256, n_head=4, batch_size=256),
    gpu_model=ModelSize(n_layer=4, n_embd=768, n_head=12, batch_size=256),
    eval_batch_size=256,
    warmup_steps=3,
    steps_per_repeat=4,
    gpu_warmup_steps=10,
    gpu_steps_per_repeat=20,
    matmul_n=2048,
    matmul_iters=4,
    gpu_matmul_n=8192,
    eval_repeats=1,
)

QUICK = BenchSizes(
    gen=GenConfig(num_ga_entities=400, test_size=200),
    cpu_model=ModelSize(n_layer=1, n_embd=32, n_head=2, batch_size=32),
    gpu_model=ModelSize(n_layer=1, n_embd=64, n_head=2, batch_size=32),
    eval_batch_size=32,
    warmup_steps=1,
    steps_per_repeat=2,
    gpu_warmup_steps=1,
    gpu_steps_per_repeat=2,
    matmul_n=256,
    matmul_iters=2,
    gpu_matmul_n=512,
    eval_repeats=1,
)


# ----------------------------------------------------------------------------- configuration


def model_config(size: ModelSize) -> RunConfig:
    """The default run configuration (dropout 0.1, JEPA on, k = 1, cosine) at the given size."""
    cfg = RunConfig()
    cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head = size.n_layer, size.n_embd, size.n_head
    cfg.train.batch_size = size.batch_size
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- timing helpers


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_share(cpu_start: float, wall_start: float) -> float:
    """Process CPU seconds / (wall seconds x torch threads) since the starts: well below 1 when
    other work on the machine took the cores (the figures are then pessimistic)."""
    wall = time.perf_counter() - wall_start
    return (time.process_time() - cpu_start) / max(wall * torch.get_num_threads(), 1e-9)


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainSpec:
    """One training figure: a model size, precision, device and step variant."""

    size: ModelSize
    precision: str
    device: torch.device
    variant: str = "eager"
    cpu_kernels: bool = False


def run_config(spec: TrainSpec, data_dir: Path, out_dir: Path, max_steps: int) -> RunConfig:
    """The run configuration of a TrainSpec: the default run at the spec's size, no
    evaluation, checkpoint or log record within `max_steps`."""
    if spec.variant not in STEP_VARIANTS:
        raise ValueError(f"unknown step variant {spec.variant!r}")
    cfg = model_config(spec.size)
    tc = cfg.train
    tc.data_dir, tc.output_dir, tc.max_steps = str(data_dir), str(out_dir), max_steps
    tc.device, tc.precision = spec.device.type, spec.precision
    tc.compile = "off" if spec.variant == "eager" else "on"
    tc.cuda_graphs = "on" if spec.variant == "graphs" else "off"
    tc.cpu_kernels = "on" if spec.cpu_kernels else "off"
    tc.eval_steps = tc.log_interval = tc.save_steps = max_steps + 1
    tc.save_step_dense = 0
    return resolve_config(cfg, {}, None, None, None, 1)


class TrainBench:
    """A real run (`setup_run`) whose `Trainer` takes the steps, timed in repeats that can be
    interleaved with another TrainBench's (so that two precisions see the same machine load,
    repeat by repeat). Step i is the trainer's step i: two benches see identical batches."""

    def __init__(
        self, spec: TrainSpec, data_dir: Path, out_dir: Path, steps: int, max_steps: int
    ) -> None:
        run = setup_run(run_config(spec, data_dir, out_dir, max_steps), None, None, Dist(), None)
        if run is None:  # a fresh output directory always has steps to run
            raise RuntimeError("bench: the run had nothing to do")
        self.spec, self.run, self.steps = spec, run, steps
        # the compile probe of setup_run falls back to the eager model when compiling fails
        self.fell_back = spec.variant != "eager" and run.ctx.run_model is run.model
        self.preempt = Preemption()
        self.trainer = Trainer(run, self.preempt)
        if self.trainer.progress is not None:  # no progress bar inside the bench
            self.trainer.progress.close()
            self.trainer.progress = None
        self.warmup_steps, self.warmup_seconds = 0, 0.0
        self.seconds: list[float] = []
        self.shapes: list[tuple[int, int, int]] = []  # (rows, row_len, scored) of timed steps
        self.costs: list[tuple[int, float]] = []  # (tokens, FLOPs) of timed steps
        self.cpu_seconds, self.wall_seconds = 0.0, 0.0
        self.res = None

    def _steps(self, n: int) -> float:
        """Wall seconds of the trainer's next n steps."""
        device = self.run.device
        sync_device(device)
        t0 = time.perf_counter()
        for _ in range(n):
            self.res = self.trainer.train_one_step()
        sync_device(device)
        return time.perf_counter() - t0

    def warm(self, steps: int) -> None:
        self.warmup_seconds += self._steps(steps)
        self.warmup_steps += steps

    def repeat(self) -> None:
        """One timed repeat (the batches' shapes and costs are computed before the clock)."""
        run, oc = self.run, self.run.config.objective
        for step in range(self.trainer.step, self.trainer.step + self.steps):
            kind = run.sampler.batch(step).kind
            e = run.dataset.entity_len
            self.shapes.append(batch_shape(kind, 2 * e + 2, e, oc.jepa_active, oc.k_pred_tok))
            cost = run.model.step_cost(kind)
            self.costs.append((cost.tokens, cost.flops))
        c0 = time.process_time()
        dt = self._steps(self.steps)
        self.seconds.append(dt)
        self.cpu_seconds += time.process_time() - c0
        self.wall_seconds += dt

    def close(self) -> None:
        self.preempt.restore()

    def result(self) -> dict[str, Any]:
        """The figures of the timed repeats."""
        if not self.seconds or self.res is None:
            raise ValueError("no timed repeat")
        loss = float(self.res.loss)
        if not math.isfinite(loss):
            raise UserError(f"bench: non-finite training loss {loss} ({self.spec.precision})")
        k, n, batch = self.steps, len(self.shapes), self.run.config.train.batch_size
        rates: dict[str, list[float]] = {"steps": [], "tokens": [], "flops": []}
        for i, dt in enumerate(self.seconds):
            window = self.costs[i * k : (i + 1) * k]
            rates["steps"].append(k / dt)
            rates["tokens"].append(sum(t for t, _ in window) / dt)
            rates["flops"].append(sum(f for _, f in window) / dt)
        steps_per_s = _median(rates["steps"])
        return {
            "precision": self.run.ctx.precision,
            "device": str(self.run.device),
            "variant": self.spec.variant,
            "cpu_kernels": uses_cpu_kernels(self.run.model),
            "parameters": sum(p.numel() for p in self.run.model.parameters()),
            "batch_size": batch,
            "rows_per_step": sum(r for r, _, _ in self.shapes) / n,
            "row_len": self.shapes[0][1],
            "scored_per_step": self.shapes[0][2],
            "tokens_per_step": sum(t for t, _ in self.costs) / n,
            "flops_per_step": sum(f for _, f in self.costs) / n,
            "warmup_steps": self.warmup_steps,
            "warmup_seconds": self.warmup_seconds,
            "steps_per_repeat": k,
            "repeat_seconds": self.seconds,
            "steps_per_s": steps_per_s,
            "seconds_per_step": 1.0 / steps_per_s,
            "tokens_per_s": _median(rates["tokens"]),
            "items_per_s": steps_per_s * batch,
            "achieved_flops_per_s": _median(rates["flops"]),
            "best_steps_per_s": max(rates["steps"]),
            "best_achieved_flops_per_s": max(rates["flops"]),
            "cpu_share": self.cpu_seconds / max(self.wall_seconds * torch.get_num_threads(), 1e-9),
            "last_loss": loss,
        }


def bench_train(
    data_dir: Path, specs: list[TrainSpec], repeats: int, warmup: int, steps: int
) -> list[dict[str, Any]]:
    """Time the trainer's steps of a run per spec; repeats interleaved across the specs. A
    compiled variant whose compile probe fell back to eager is {"skipped": why}."""
    work = Path(tempfile.mkdtemp(prefix="revjepa-bench-runs-"))
    benches: list[TrainBench] = []
    try:
        for i, spec in enumerate(specs):
            benches.append(
                TrainBench(spec, data_dir, work / f"run{i}", steps, warmup + repeats * steps)
            )
        for b in benches:
            b.warm(warmup)
        for _ in range(repeats):
            for b in benches:
                b.repeat()
        return [
            {"skipped": "the torch.compile probe failed: the trainer fell back to eager"}
            if b.fell_back
            else b.result()
            for b in benches
        ]
    finally:
        for b in reversed(benches):  # each gives back the signal handlers it found
            b.close()
        close_logging()
        shutil.rmtree(work, ignore_errors=True)


def paired_speedup(slow: dict[str, Any], fast: dict[str, Any]) -> float:
    """Median over repeats of slow / fast repeat seconds (interleaved repeats see the same load)."""
    return _median([a / b for a, b in zip(slow["repeat_seconds"], fast["repeat_seconds"])])


# ----------------------------------------------------------------------------- matmul


def bench_matmul(
    n: int, dtype: torch.dtype, device: torch.device, repeats: int, iters: int
) -> dict[str, Any]:
    """Median FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs) in `dtype` (flops.py)."""
    rates = matmul_rates(device, dtype, n, repeats, iters)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops_per_s": _median(rates)}


def step_gemm_shapes(
    n_layer: int, n_embd: int, n_rows: int, row_len: int, n_scored: int, vocab: int
) -> list[tuple[int, int, int]]:
    """(m, k, n) of every weight GEMM of one training step (the matmul terms of
    `train_step_flops` without the small attention products): each forward (m, k) x (k, n)
    plus its two backward GEMMs, (m, n) x (n, k) for the input and (k, m) x (m, n) for the
    weight gradient."""
    d, tokens = n_embd, n_rows * row_len
    forward = [(tokens, d, 3 * d), (tokens, d, d), (tokens, d, 4 * d), (tokens, 4 * d, d)]
    forward = forward * n_layer + [(n_scored, d, vocab)]
    return [s for m, k, n in forward for s in ((m, k, n), (m, n, k), (k, m, n))]


def bench_step_gemms(
    shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device, repeats: int
) -> dict[str, Any]:
    """FLOP/s of the step's GEMMs alone, each timed on its own (median of `repeats`): the
    ceiling that a step made only of these matmuls would reach."""
    g = torch.Generator().manual_seed(0)
    seconds, flops = 0.0, 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
        a @ b  # warm-up (oneDNN builds its kernel for a new shape here)
        times = []
        for _ in range(repeats):
            sync_device(device)
            t0 = time.perf_counter()
            a @ b
            sync_device(device)
            times.append(time.perf_counter() - t0)
        seconds += _median(times)
        flops += 2.0 * m * k * n
    return {
        "gemms": len(shapes),
        "flops": flops,
        "seconds": seconds,
        "flops_per_s": flops / seconds,
    }


def _cpu_specs(size: ModelSize, wanted: list[str], cpu_kernels: bool = False) -> list[TrainSpec]:
    return [TrainSpec(size, p, torch.device("cpu"), "eager", cpu_kernels) for p in wanted]


def bench_cpu_kernels(
    data_dir: Path, sizes: BenchSizes, wanted: list[str], train_cpu, matmul_cpu, repeats: int
) -> tuple[dict[str, Any], str | None]:
    """The CPU training figures of `--cpu_kernels on` (fused ops + glibc malloc settings) and
    the library's file name; ({"skipped": why}, None) where the kernels do not build here."""
    try:
        lib = kernels.load()
    except KernelsUnavailable as exc:
        return {"skipped": str(exc)}, None
    _log(f"bench: training steps, cpu {' and '.join(wanted)}, --cpu_kernels on")
    measured = bench_train(
        data_dir,
        _cpu_specs(sizes.cpu_model, wanted, cpu_kernels=True),
        repeats,
        sizes.warmup_steps,
        sizes.steps_per_repeat,
    )
    tuned = tune_glibc_malloc()  # already applied by the runs' set-up: whether it took effect
    out: dict[str, Any] = {p: train_cpu[p] for p in ("fp32", "bf16") if p not in wanted}
    for precision, tr in zip(wanted, measured):
        tr["glibc_malloc_tuned"] = tuned
        tr["fraction_of_matmul"] = tr["achieved_flops_per_s"] / matmul_cpu[precision]["flops_per_s"]
        # not paired: the default step ran earlier in this process (ratio of the medians)
        tr["speedup_over_default"] = tr["steps_per_s"] / train_cpu[precision]["steps_per_s"]
        out[precision] = tr
    if "skipped" not in out["bf16"]:
        out["bf16_speedup"] = paired_speedup(out["fp32"], out["bf16"])
    return out, str(lib._name)


def _cpu_trainings(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The CPU training figures of both steps (default, and `--cpu_kernels on` if measured)."""
    out = list(results["train_cpu"].values())
    kern = results.get("train_cpu_kernels", {})
    return out + [kern[p] for p in ("fp32", "bf16") if p in kern]


# ----------------------------------------------------------------------------- evaluation


def bench_eval(
    valid: dict[str, Split], vocab, entity_len: int, size: ModelSize, batch_size: int, repeats: int
) -> dict[str, Any]:
    """Items/s of `evaluate_split` over the validation splits (float32, CPU)."""
    cfg = model_config(size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.objective, vocab, entity_len)
    first = next(iter(valid.values()))
    evaluate_split(model, Split(first.seq[:batch_size], first.kind[:batch_size]), batch_size)
    per_split: dict[str, list[float]] = {name: [] for name in valid}
    totals = []
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        total = 0.0
        for name, split in valid.items():
            t0 = time.perf_counter()
            evaluate_split(model, split, batch_size)
            dt = time.perf_counter() - t0
            per_split[name].append(dt)
            total += dt
        totals.append(total)
    n_items = sum(len(s) for s in valid.values())
    total = _median(totals)
    return {
        "batch_size": batch_size,
        "items": n_items,
        "repeats": repeats,
        "total_seconds": total,
        "items_per_s": n_items / total,
        "cpu_share": _cpu_share(cpu_start, wall_start),
        "splits": {
            name: {"items": len(valid[name]), "items_per_s": len(valid[name]) / _median(ts)}
            for name, ts in per_split.items()
        },
    }


# ----------------------------------------------------------------------------- memory of loading

_RSS_CHILD = r"""
import json, sys, time
from pathlib import Path
import revjepa.data as data  # the same imports in both modes: equal baselines


def hwm_mib():
    # VmHWM: the peak RSS of this process image (ru_maxrss would report the forking parent's)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


mode, data_dir = sys.argv[1], Path(sys.argv[2])
base = hwm_mib()
t0 = time.perf_counter()
if mode == "load_dataset":
    obj = data.load_dataset(data_dir)
else:
    with open(data_dir / "train.json", encoding="utf-8") as fh:
        obj = json.load(fh)
seconds = time.perf_counter() - t0
print(json.dumps({"baseline_mib": base, "peak_mib": hwm_mib(), "seconds": seconds}))
"""


def load_rss(data_dir: Path, mode: str) -> dict[str, float]:
    """Peak RSS of a fresh interpreter that only loads the dataset (`load_dataset` or `json`)."""
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, mode, str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise UserError(f"bench: the {mode} memory probe failed: {tail}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["delta_mib"] = out["peak_mib"] - out["baseline_mib"]
    return out


# ----------------------------------------------------------------------------- the command


def _log(msg: str) -> None:
    print(msg, flush=True)


def bench_data(sizes: BenchSizes, data_dir: Path) -> tuple[Dataset, dict[str, Any]]:
    """Generate the dataset in memory, write it to `data_dir`, load it like the trainer; the
    data figures and the memory probes of loading it (subprocesses)."""
    _log("bench: generating the dataset")
    t0 = time.perf_counter()
    gen = generate(sizes.gen)
    gen_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    written = write_generated(gen, data_dir)
    write_seconds = time.perf_counter() - t0
    del gen
    t0 = time.perf_counter()
    ds = load_dataset(data_dir)
    load_seconds = time.perf_counter() - t0
    _log("bench: measuring the memory of loading (subprocesses)")
    data = {
        "gen_config": asdict(sizes.gen),
        "train_items": len(ds.train),
        "train_kind_train_share": float((ds.train.kind == KIND_ID["train"]).float().mean()),
        "vocab_size": ds.vocab.size,
        "gen_seconds": gen_seconds,
        "write_seconds": write_seconds,
        "load_seconds": load_seconds,
        "train_json_mib": written["train.json"].stat().st_size / 2**20,
        "rss": {
            "load_dataset": load_rss(data_dir, "load_dataset"),
            "json": load_rss(data_dir, "json"),
        },
    }
    return ds, data


def bench_gpu(data_dir: Path, sizes: BenchSizes, repeats: int) -> dict[str, Any]:
    """The seed's configuration on the GPU, each step variant a real run (bf16 where the GPU
    has it), and the GPU's matmul throughput."""
    if not torch.cuda.is_available():
        return {"skipped": "CUDA not available"}
    gpu = torch.device("cuda", torch.cuda.current_device())
    out: dict[str, Any] = {"device_name": torch.cuda.get_device_name(gpu)}
    precision = resolve_precision("bf16", gpu, lambda _m: None)
    for variant in STEP_VARIANTS:
        _log(f"bench: training steps, gpu {precision} {variant}")
        spec = TrainSpec(sizes.gpu_model, precision, gpu, variant)
        try:
            (out[variant],) = bench_train(
                data_dir, [spec], repeats, sizes.gpu_warmup_steps, sizes.gpu_steps_per_repeat
            )
        except Exception as exc:  # compile support varies by platform
            if variant == "eager":
                raise
            out[variant] = {"skipped": one_line(exc, 300)}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out["matmul"] = bench_matmul(sizes.gpu_matmul_n, dtype, gpu, repeats, 10)
    for variant in STEP_VARIANTS:
        tr = out[variant]
        if "skipped" not in tr:
            tr["fraction_of_matmul"] = tr["achieved_flops_per_s"] / out["matmul"]["flops_per_s"]
    out["peak_allocated_mib"] = torch.cuda.max_memory_allocated(gpu) / 2**20
    return out


def _wanted_precisions() -> tuple[list[str], dict[str, Any]]:
    """The CPU precisions this machine trains in, and {precision: {"skipped": why}} for the rest."""
    wanted, skipped, notices = [], {}, []
    for precision in ("fp32", "bf16"):
        if resolve_precision(precision, torch.device("cpu"), notices.append) != precision:
            skipped[precision] = {"skipped": notices[-1] if notices else "unsupported"}
        else:
            wanted.append(precision)
    return wanted, skipped


def bench_cpu_training(
    data_dir: Path, sizes: BenchSizes, repeats: int, vocab: int, wanted: list[str],
    skipped: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The default CPU step in each wanted precision (repeats interleaved), the CPU matmul in
    the same precisions, and each step's GEMMs alone: (train_cpu, matmul_cpu)."""
    cpu = torch.device("cpu")
    _log(f"bench: training steps, cpu {' and '.join(wanted)}, the default step (torch ops)")
    specs = _cpu_specs(sizes.cpu_model, wanted)
    measured = bench_train(data_dir, specs, repeats, sizes.warmup_steps, sizes.steps_per_repeat)
    train_cpu = {**skipped, **dict(zip(wanted, measured))}
    train_cpu = {p: train_cpu[p] for p in ("fp32", "bf16")}
    _log("bench: matmul throughput")
    matmul_cpu: dict[str, Any] = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if precision in wanted:
            matmul_cpu[precision] = bench_matmul(
                sizes.matmul_n, dtype, cpu, repeats, sizes.matmul_iters
            )
        else:
            matmul_cpu[precision] = {"skipped": train_cpu[precision]["skipped"]}
    for precision in wanted:
        tr, peak = train_cpu[precision], matmul_cpu[precision]["flops_per_s"]
        tr["fraction_of_matmul"] = tr["achieved_flops_per_s"] / peak
        size = sizes.cpu_model
        shapes = step_gemm_shapes(
            size.n_layer, size.n_embd, round(tr["rows_per_step"]), tr["row_len"],
            tr["scored_per_step"], vocab,
        )  # fmt: skip
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        gemms = bench_step_gemms(shapes, dtype, cpu, repeats)
        gemms["fraction_of_matmul"] = gemms["flops_per_s"] / peak
        tr["step_gemms_alone"] = gemms
    return train_cpu, matmul_cpu


def run_bench(output: Path, repeats: int, quick: bool) -> dict[str, Any]:
    """Run every measurement, print a table, write the JSON results to `output`; return them."""
    if repeats < 1:
        raise UserError("--repeats must be >= 1")
    if output.is_dir():
        raise UserError(f"--output {output} is a directory")
    sizes = QUICK if quick else FULL
    load_start, wall_start = _loadavg(), time.perf_counter()
    results: dict[str, Any] = {}
    data_dir = Path(tempfile.mkdtemp(prefix="revjepa-bench-"))
    try:
        ds, results["data"] = bench_data(sizes, data_dir)
        rss = results["data"].pop("rss")
        results["gpu"] = bench_gpu(data_dir, sizes, repeats)  # first: its table comes first
        wanted, skipped = _wanted_precisions()
        train_cpu, matmul_cpu = bench_cpu_training(
            data_dir, sizes, repeats, ds.vocab.size, wanted, skipped
        )
        results["train_cpu"], results["matmul_cpu"] = train_cpu, matmul_cpu
        if "skipped" not in train_cpu["bf16"]:
            results["bf16_speedup"] = paired_speedup(train_cpu["fp32"], train_cpu["bf16"])
        _log("bench: evaluation")
        results["eval"] = bench_eval(
            ds.valid, ds.vocab, ds.entity_len, sizes.cpu_model, sizes.eval_batch_size,
            min(repeats, sizes.eval_repeats),
        )  # fmt: skip
        # last of the CPU figures: the malloc settings of --cpu_kernels on stay for the process
        results["train_cpu_kernels"], lib_name = bench_cpu_kernels(
            data_dir, sizes, wanted, train_cpu, matmul_cpu, repeats
        )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    results["memory"] = {
        "peak_rss_mib": _peak_rss_mib(),
        "load_dataset": rss["load_dataset"],
        "json_load_train": rss["json"],
        "load_vs_json_delta_ratio": rss["load_dataset"]["delta_mib"]
        / max(rss["json"]["delta_mib"], 1e-9),
    }
    results["bench_seconds"] = time.perf_counter() - wall_start
    shares = [tr["cpu_share"] for tr in _cpu_trainings(results) if "cpu_share" in tr]
    results["machine_busy"] = bool(shares) and min(shares) < BUSY_CPU_SHARE
    report = _report(sizes, quick, repeats, lib_name, load_start, results)
    print(format_table(report))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


def _report(
    sizes: BenchSizes,
    quick: bool,
    repeats: int,
    lib_name: str | None,
    load_start: float | None,
    results: dict[str, Any],
) -> dict[str, Any]:
    """The JSON report: the machine, the configuration, the results."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_model_name(),
        "cpu_has_bf16": cpu_has_bf16(),
        "threads": torch.get_num_threads(),
        # the C kernels' library when the `--cpu_kernels on` step was measured too, else None
        # (results.train_cpu_kernels.skipped says why); results.train_cpu is the default step
        "cpu_kernels": lib_name,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_1min": {"start": load_start, "end": _loadavg()},
        "config": {
            "quick": quick,
            "repeats": repeats,
            "cpu_model": asdict(sizes.cpu_model),
            "gpu_model": asdict(sizes.gpu_model),
            "objective": "JEPA on, k=1, cosine, dropout 0.1, lr 1e-4 constant, fused AdamW",
            "eval_batch_size": sizes.eval_batch_size,
            "warmup_steps": sizes.warmup_steps,
            "steps_per_repeat": sizes.steps_per_repeat,
            "matmul_n": sizes.matmul_n,
            "matmul_iters": sizes.matmul_iters,
        },
        "results": results,
    }


# ----------------------------------------------------------------------------- the table


def _g(x: float) -> str:
    g = x / 1e9
    return f"{g:,.1f}" if g >= 10 else f"{g:.3f}"


def _cpu_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The default CPU step's rows."""
    rows: list[tuple[str, str, str]] = []
    for precision in ("fp32", "bf16"):
        tr = r["train_cpu"][precision]
        if "skipped" in tr:
            rows.append((f"train cpu {precision}", "skipped", tr["skipped"]))
            continue
        mm = r["matmul_cpu"][precision]
        rows += [
            (f"train cpu {precision} steps/s", f"{tr['steps_per_s']:.3f}", "steps/s"),
            (f"train cpu {precision} steps/s best", f"{tr['best_steps_per_s']:.3f}", "steps/s"),
            (f"train cpu {precision} tokens/s", f"{tr['tokens_per_s']:,.0f}", "tokens/s"),
            (f"train cpu {precision} items/s", f"{tr['items_per_s']:,.0f}", "items/s"),
            (f"train cpu {precision} achieved", _g(tr["achieved_flops_per_s"]), "GFLOP/s"),
            (f"matmul {mm['n']} {precision}", _g(mm["flops_per_s"]), "GFLOP/s"),
            (f"train/matmul {precision}", f"{tr['fraction_of_matmul']:.3f}", "ratio"),
            (
                f"step GEMMs alone/matmul {precision}",
                f"{tr['step_gemms_alone']['fraction_of_matmul']:.3f}",
                "ratio (ceiling of train/matmul)",
            ),
            (f"train cpu {precision} CPU share", f"{tr['cpu_share']:.2f}", "of threads x wall"),
        ]
    if "bf16_speedup" in r:
        rows.append(("bf16 speed-up over fp32 (paired)", f"{r['bf16_speedup']:.2f}", "x"))
    return rows


def _kernel_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The `--cpu_kernels on` step's rows."""
    kern = r.get("train_cpu_kernels", {"skipped": "not measured"})
    if "skipped" in kern:
        return [("train cpu, --cpu_kernels on", "skipped", kern["skipped"][:60])]
    rows: list[tuple[str, str, str]] = []
    for precision in ("fp32", "bf16"):
        tr = kern[precision]
        if "skipped" in tr:
            continue
        name = f"train cpu {precision} --cpu_kernels on"
        rows += [
            (f"{name} steps/s", f"{tr['steps_per_s']:.3f}", "steps/s"),
            (f"{name} achieved", _g(tr["achieved_flops_per_s"]), "GFLOP/s"),
            (f"{name} train/matmul", f"{tr['fraction_of_matmul']:.3f}", "ratio"),
            (
                f"{name} speed-up",
                f"{tr['speedup_over_default']:.2f}",
                "x the default step (ratio of medians)",
            ),
            (f"{name} CPU share", f"{tr['cpu_share']:.2f}", "of threads x wall"),
        ]
    if "bf16_speedup" in kern:
        rows.append(
            ("bf16 speed-up, --cpu_kernels on (paired)", f"{kern['bf16_speedup']:.2f}", "x")
        )
    return rows


def _gpu_rows(g: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The GPU's rows (the first of the table)."""
    if "skipped" in g:
        return [("gpu", "skipped", g["skipped"])]
    rows: list[tuple[str, str, str]] = []
    for variant in STEP_VARIANTS:
        tr = g[variant]
        if "skipped" in tr:
            rows.append((f"gpu {variant}", "skipped", tr["skipped"][:60]))
            continue
        rows += [
            (f"gpu {variant} steps/s", f"{tr['steps_per_s']:.2f}", "steps/s"),
            (f"gpu {variant} tokens/s", f"{tr['tokens_per_s']:,.0f}", "tokens/s"),
            (f"gpu {variant} achieved", _g(tr["achieved_flops_per_s"]), "GFLOP/s"),
            (f"gpu {variant} train/matmul", f"{tr['fraction_of_matmul']:.3f}", "ratio"),
        ]
    rows.append((f"gpu matmul {g['matmul']['n']}", _g(g["matmul"]["flops_per_s"]), "GFLOP/s"))
    return rows


def _other_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Evaluation, data and memory rows."""
    ev, d, m = r["eval"], r["data"], r["memory"]
    return [
        ("eval items/s (3 splits)", f"{ev['items_per_s']:,.0f}", "items/s"),
        ("eval total", f"{ev['total_seconds']:.2f}", "s"),
        ("dataset generation", f"{d['gen_seconds']:.2f}", "s"),
        ("dataset write (JSON)", f"{d['write_seconds']:.2f}", "s"),
        ("dataset load", f"{d['load_seconds']:.2f}", "s"),
        ("peak RSS (bench process)", f"{m['peak_rss_mib']:,.0f}", "MiB"),
        ("load_dataset peak RSS", f"{m['load_dataset']['peak_mib']:,.0f}", "MiB"),
        ("  above baseline", f"{m['load_dataset']['delta_mib']:,.0f}", "MiB"),
        ("json.load(train.json) peak RSS", f"{m['json_load_train']['peak_mib']:,.0f}", "MiB"),
        ("  above baseline", f"{m['json_load_train']['delta_mib']:,.0f}", "MiB"),
        ("load / json.load (above baseline)", f"{m['load_vs_json_delta_ratio']:.2f}", "ratio"),
        ("bench wall time", f"{r['bench_seconds']:.1f}", "s"),
    ]


def table_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, unit) rows of the printed table: the GPU first, then the CPU."""
    r = report["results"]
    return _gpu_rows(r["gpu"]) + _cpu_rows(r) + _kernel_rows(r) + _other_rows(r)


def busy_warning(report: dict[str, Any]) -> str | None:
    """A warning line when other work took the cores during the timed training repeats."""
    shares = [tr["cpu_share"] for tr in _cpu_trainings(report["results"]) if "cpu_share" in tr]
    if shares and min(shares) < BUSY_CPU_SHARE:
        return (
            f"WARNING: the machine was busy (CPU share {min(shares):.2f} < {BUSY_CPU_SHARE}): "
            "the timings are pessimistic; rerun on an idle machine"
        )
    return None


def format_table(report: dict[str, Any]) -> str:
    rows = table_rows(report)
    la = report["load_average_1min"]
    head = [
        f"revjepa bench  {report['date']}  torch {report['torch']}  {report['threads']} threads",
        f"cpu: {report['cpu_model']}  (load average start {la['start']}, end {la['end']})",
        "CPU training: the default step (torch ops)"
        + (
            " and --cpu_kernels on (C kernels)"
            if report.get("cpu_kernels")
            else " only (--cpu_kernels on not measured: the C kernels did not build)"
        ),
    ]
    busy = busy_warning(report)
    if busy:
        head.append(busy)
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    header = f"{'figure':<{w0}}  {'value':>{w1}}  unit"
    lines = [*head, header, "-" * len(header)]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)
