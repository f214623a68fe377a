"""Where the time of one GPU training step goes, at the seed's configuration (bf16).

Run on a CUDA machine: `PYTHONPATH=src python3 scripts/gpu_step_profile.py OUT_DIR [VARIANT...]`.
A variant is `eager`, `compiled` (the trainer's `compile_model` without CUDA graphs) or `graphs`
(with CUDA graphs, what the trainer uses on one GPU), optionally with `-nocudnn` (cuDNN's attention kernels off, so
SDPA picks another backend for the block mask). For each it prints the median step time and the
host time to issue a step without waiting (close to the step time = launch-bound), and for the
first variant the profiler's top operators. Writes `profile.json` and `profile_<variant>.txt`
under OUT_DIR. A diagnostic for BENCHMARKS.md, not a test; without CUDA it smoke-runs tiny.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from revjepa.bench import FULL, QUICK, TrainBench, TrainSpec, sync_device
from revjepa.data import GenConfig, generate, write_generated
from revjepa.errors import one_line


def _take_steps(b: TrainBench, n: int) -> None:
    for _ in range(n):
        b.res = b.trainer.train_one_step()


def _time_steps(b: TrainBench, steps: int, repeats: int) -> dict[str, float]:
    per_step, issue = [], []
    for _ in range(repeats):
        sync_device(b.run.device)
        t0 = time.perf_counter()
        _take_steps(b, steps)
        t1 = time.perf_counter()
        sync_device(b.run.device)
        t2 = time.perf_counter()
        issue.append((t1 - t0) / steps)
        per_step.append((t2 - t0) / steps)
    return {
        "ms_per_step": 1e3 * statistics.median(per_step),
        "host_issue_ms_per_step": 1e3 * statistics.median(issue),
        "steps_per_s": 1.0 / statistics.median(per_step),
        "loss": float(b.res.loss),
    }


def _profile(b: TrainBench, dev: torch.device, path: Path) -> float:
    """Profiler table of 5 steps to `path`; returns device kernels per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _take_steps(b, 5)
        sync_device(b.run.device)
    table = prof.key_averages().table(sort_by=f"{dev.type}_time_total", row_limit=30)
    path.write_text(table)
    print(table[:5000], flush=True)
    return len([e for e in prof.events() if e.device_type.name == "CUDA"]) / 5


def run_variant(variant: str, data_dir: Path, run_dir: Path, dev, out_dir: Path, first) -> dict:
    """One step variant as the real trainer runs it (bench.TrainBench), bf16."""
    base = variant.removesuffix("-nocudnn")
    if dev.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(not variant.endswith("-nocudnn"))
    size = FULL.gpu_model if dev.type == "cuda" else QUICK.gpu_model
    b = TrainBench(TrainSpec(size, "bf16", dev, base), data_dir, run_dir, 20, 1000)
    try:
        t0 = time.perf_counter()
        _take_steps(b, 15)
        sync_device(b.run.device)
        res = _time_steps(b, 20, 5)
        res["warmup_s_15_steps"] = time.perf_counter() - t0
        from torch._dynamo.utils import counters

        # cudagraph_skips > 0: inductor found the graph unsafe to capture and ran it without
        res["inductor_counters"] = {k: v for k, v in counters["inductor"].items() if "graph" in k}
        res["fell_back_to_eager"] = b.fell_back
        if first:
            res["kernels_per_step"] = _profile(b, dev, out_dir / f"profile_{variant}.txt")
    finally:
        b.close()
    return res


def main(out_dir: Path, variants: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # without CUDA: a tiny CPU smoke run of this script itself (its figures mean nothing)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        write_generated(generate(GenConfig()), data_dir)
        for i, variant in enumerate(variants):
            try:
                run_dir = Path(tmp) / f"run_{i}"
                res = run_variant(variant, data_dir, run_dir, dev, out_dir, i == 0)
            except Exception as exc:  # a failing variant must not hide the others' figures
                res = {"failed": one_line(exc)}
            results[variant] = res
            print(variant, json.dumps(res), flush=True)
            (out_dir / "profile.json").write_text(json.dumps(results, indent=2) + "\n")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    for name, r in results.items():
        if "failed" in r:
            print(f"{name:24s} FAILED {r['failed']}")
        else:
            print(
                f"{name:24s} {r['ms_per_step']:7.2f} ms/step {r['steps_per_s']:7.1f} steps/s "
                f"host issue {r['host_issue_ms_per_step']:6.2f} ms"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["eager", "compiled", "graphs"])
