"""Where the time of one GPU training step goes, at the seed's configuration (bf16).

Run on a CUDA machine: `PYTHONPATH=src python3 scripts/gpu_step_profile.py OUT_DIR`. For each
variant (eager; torch.compile default; torch.compile "reduce-overhead", i.e. CUDA graphs) it
prints the median step time, and for eager also the host time to issue a step (no sync: if it
is close to the step time, the step is launch-bound) and the profiler's top kernels. Writes
`profile.json` and `profile_eager.txt` under OUT_DIR. A diagnostic for BENCHMARKS.md, not a test.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from revjepa.bench import FULL, QUICK, TrainBench, _sync
from revjepa.data import GenConfig, generate, load_dataset, write_generated
from revjepa.train import compile_model


def _time_steps(b: TrainBench, steps: int, repeats: int) -> dict[str, float]:
    per_step, issue = [], []
    for _ in range(repeats):
        _sync(b.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            b._run(b.step)
            b.step += 1
        t1 = time.perf_counter()
        _sync(b.device)
        t2 = time.perf_counter()
        issue.append((t1 - t0) / steps)
        per_step.append((t2 - t0) / steps)
    return {
        "ms_per_step": 1e3 * statistics.median(per_step),
        "host_issue_ms_per_step": 1e3 * statistics.median(issue),
        "steps_per_s": 1.0 / statistics.median(per_step),
        "loss": float(b.res.loss),
    }


def main(out_dir: Path, variants: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_generated(generate(GenConfig()), Path(tmp))
        ds = load_dataset(Path(tmp))
    seq, kind, vocab, entity_len = ds.train.seq, ds.train.kind, ds.vocab, ds.entity_len
    # without CUDA: a tiny CPU smoke run of this script itself (its figures mean nothing)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = FULL.gpu_model if dev.type == "cuda" else QUICK.gpu_model
    results: dict[str, dict] = {}
    for variant in variants:
        compiled = variant != "eager"
        b = TrainBench(seq, kind, vocab, entity_len, size, "bf16", dev, 20)
        if compiled:
            mode = None if variant == "compiled" else variant
            # compile_model's settings, with the mode of this variant
            compile_model(b.model)
            b.run_model = torch.compile(b.model, dynamic=True, mode=mode)
        t0 = time.perf_counter()
        b.warm(15)
        warm_s = time.perf_counter() - t0
        res = _time_steps(b, 20, 5)
        res["warmup_s_15_steps"] = warm_s
        results[variant] = res
        print(variant, json.dumps(res), flush=True)
        if variant == "eager":
            from torch.profiler import ProfilerActivity, profile

            with profile(
                activities=[ProfilerActivity.CPU]
                + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            ) as prof:
                for _ in range(5):
                    b._run(b.step)
                    b.step += 1
                _sync(b.device)
            table = prof.key_averages().table(sort_by=f"{dev.type}_time_total", row_limit=30)
            (out_dir / "profile_eager.txt").write_text(table)
            events = [e for e in prof.events() if e.device_type.name == "CUDA"]
            results[variant]["cuda_kernels_per_step"] = len(events) / 5
            print(table[:6000], flush=True)
        del b
        torch.cuda.empty_cache()
    (out_dir / "profile.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, r in results.items():
        print(
            f"{name:18s} {r['ms_per_step']:7.2f} ms/step {r['steps_per_s']:7.1f} steps/s "
            f"host issue {r['host_issue_ms_per_step']:6.2f} ms"
        )


if __name__ == "__main__":
    wanted = sys.argv[2:] or ["eager", "compiled", "reduce-overhead"]
    main(Path(sys.argv[1]), wanted)
