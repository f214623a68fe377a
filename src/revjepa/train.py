"""The step-based training loop (single process or torchrun/DDP).

Step N means N optimizer updates done. The batch of a step is a pure function of (seed, step):
one seeded permutation per epoch, global batch = batch_size x world size, rank r takes slice r.
So resuming needs only the step, and 1-process and N-process runs see the same examples.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import (
    find_latest_valid,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from .config import RESUMABLE_OVERRIDES, RunConfig
from .data import Dataset, load_dataset
from .errors import UserError, one_line
from .evaluate import append_jsonl, evaluate_split, read_jsonl
from .faults import crash, crash_requested
from .model import build_model, collapse_signal, to_device
from .schedule import checkpoint_steps, lr_multiplier, should_eval, should_save

log = logging.getLogger("revjepa.train")


# ----------------------------------------------------------------------------- small pieces


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def launcher_world_size() -> int:
    """The number of processes the launcher (torchrun or srun) started, before any set-up."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_STEP_NUM_TASKS") or 1)


def init_distributed(device_kind: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a bare `srun` (one task per GPU) sets SLURM_*."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        if "MASTER_ADDR" not in os.environ:
            raise UserError("srun with several tasks: export MASTER_ADDR (and MASTER_PORT) first")
        os.environ["WORLD_SIZE"] = os.environ["SLURM_STEP_NUM_TASKS"]
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_PORT", "29500")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(requested: str, d: Dist) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device, notice) -> str:
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            notice("bf16 is not supported on this GPU: training in float32")
            return "fp32"
        if device.type == "cpu" and not _cpu_has_bf16():
            notice("this CPU has no native bf16 support: training in float32")
            return "fp32"
    if precision == "fp16" and device.type != "cuda":
        notice("fp16 autocast needs CUDA: training in float32")
        return "fp32"
    return precision


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def stream_generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A generator for one (seed, purpose, index): no two runs or steps share a stream."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=stream_generator(seed, "epoch", epoch))


def loss_dropout_keep(seed: int, step: int, n: int, p: float) -> torch.Tensor:
    """Per-item keep mask of the global batch, a pure function of (seed, step)."""
    return torch.rand(n, generator=stream_generator(seed, "loss_dropout", step)) >= p


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (attention/MLP weights and the embeddings), not on biases/LayerNorm."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes the step, checkpoints and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signal = signum

    def restore(self) -> None:
        """Give the signals back, unless one stopped the run: then the process is on its way
        out, and a repeated signal (SLURM and the job script both send TERM) must not kill
        it with 143 after its checkpoint. SIG_IGN, because Python resets its own handlers to
        the default while the interpreter shuts down, but leaves an ignored signal ignored."""
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_IGN if self.signal is not None else handler)


class RunLock:
    """One trainer per output directory; the OS drops the lock when the process dies."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / ".lock"
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise UserError(f"{output_dir}: another trainer is running in this directory") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()


RUN_STATE = "run_state.json"


def write_run_state(output_dir: Path, state: str, step: int, max_steps: int, signum) -> None:
    """`run_state.json`: running / finished / stopped (by a signal), written atomically. The
    SLURM script reads it to requeue only a run that a signal stopped short of --max_steps."""
    record = {"state": state, "step": step, "max_steps": max_steps, "time": time.time()}
    if signum is not None:
        record["signal"] = signal.Signals(signum).name
    tmp = output_dir / f".{RUN_STATE}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, output_dir / RUN_STATE)


class _TqdmAwareHandler(logging.StreamHandler):
    """Log lines go above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=self.stream)


def setup_logging(output_dir: Path | None, main: bool) -> None:
    log.handlers.clear()
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = _TqdmAwareHandler(sys.stdout)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if output_dir is not None and main:
        fh = logging.FileHandler(output_dir / "training.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)


# ----------------------------------------------------------------------------- run set-up


def resolve_run(
    config: RunConfig, overrides: dict[str, dict[str, Any]], resume_from: str | None
) -> tuple[RunConfig, dict[str, Any] | None, Path | None]:
    """Apply resume semantics: the checkpoint's configuration wins, except resumable fields."""
    output_dir = Path(config.train.output_dir)
    if resume_from is None:
        return config, None, None
    if resume_from == "latest":
        found = find_latest_valid(output_dir / "checkpoints")
        if found is None:
            return config, None, None  # nothing to resume: a fresh start (requeue-safe)
        path, state = found
    else:
        path = Path(resume_from)
        state = load_checkpoint(path)
    saved = RunConfig.from_dict(state["config"])
    # The global batch must stay the same; the per-process batch follows the world size.
    saved_global = saved.train.batch_size * int(state.get("world_size", 1))
    world = launcher_world_size()
    given_batch = overrides.get("train", {}).get("batch_size")
    if given_batch is None and saved_global % world == 0:
        per_process = saved_global // world
    else:
        per_process = given_batch if given_batch is not None else saved.train.batch_size
    if per_process * world != saved_global:
        raise UserError(
            f"{path}: the run's global batch is {saved_global}; with {world} process(es) use "
            f"--batch_size {saved_global / world:g} (a whole number is required)"
        )
    overrides = {**overrides, "train": {**overrides.get("train", {}), "batch_size": per_process}}
    conflicts = []
    for section, values in overrides.items():
        saved_section = getattr(saved, section)
        for name, value in values.items():
            if name in RESUMABLE_OVERRIDES or name == "batch_size":
                continue
            if getattr(saved_section, name) != value:
                conflicts.append(f"--{name} {value} (checkpoint: {getattr(saved_section, name)})")
    if conflicts:
        raise UserError(f"{path}: flags conflict with the checkpoint's run: {', '.join(conflicts)}")
    merged = saved.to_dict()
    for section, values in overrides.items():
        for name, value in values.items():
            if name in RESUMABLE_OVERRIDES or name == "batch_size":
                merged[section][name] = value
    if "output_dir" not in overrides.get("train", {}) and resume_from != "latest":
        # resuming from an explicit path: keep writing next to that checkpoint's run
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        merged["train"]["output_dir"] = str(run_dir)
    resolved = RunConfig.from_dict(merged)
    resolved.validate()
    return resolved, state, path


def check_output_dir(output_dir: Path, resume_requested: bool) -> None:
    """Refuse to start a run on top of another run's files (unless resuming) or foreign files."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} exists and is not a directory")
    entries = [p for p in output_dir.iterdir() if p.name != ".lock"]
    if not entries:
        return
    if (output_dir / "training_args.json").is_file():
        if resume_requested:
            return  # --resume_from latest before the first checkpoint: start this run again
        raise UserError(
            f"--output_dir {output_dir} already holds a run: resume it with "
            "--resume_from latest or choose another directory"
        )
    raise UserError(f"--output_dir {output_dir} is not empty and is not a revjepa run")


def steps_per_epoch(n_train: int, global_batch: int, where: str) -> int:
    if n_train < global_batch:
        raise UserError(
            f"{where}: {n_train} training items are fewer than one global batch "
            f"({global_batch}); lower --batch_size"
        )
    return n_train // global_batch


# ----------------------------------------------------------------------------- the loop


def train(
    config: RunConfig,
    overrides: dict[str, dict[str, Any]] | None = None,
    resume_from: str | None = None,
) -> Path:
    """Train (or resume) a run; returns the output directory."""
    overrides = overrides or {}
    config.validate()
    config, state, resume_path = resolve_run(config, overrides, resume_from)
    tc = config.train
    d = init_distributed("cuda" if (tc.device != "cpu" and torch.cuda.is_available()) else "cpu")
    preempt = Preemption()
    try:
        return _train(config, state, resume_path, d, resume_from, preempt)
    finally:
        preempt.restore()
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config: RunConfig,
    state: dict[str, Any] | None,
    resume_path: Path | None,
    d: Dist,
    resume_from: str | None,
    preempt: Preemption,
) -> Path:
    tc, oc = config.train, config.objective
    output_dir = Path(tc.output_dir)
    ckpt_dir = output_dir / "checkpoints"
    # Everything that can reject the input runs before the first file is created or touched.
    if d.main:
        check_output_dir(output_dir, resume_from is not None)
    device = resolve_device(tc.device, d)
    use_compile = tc.compile == "on" or (tc.compile == "auto" and device.type == "cuda")
    # CUDA graphs replay a whole captured step: a single device, and no DDP hooks in between
    cuda_graphs = (
        use_compile and device.type == "cuda" and not d.enabled and tc.cuda_graphs != "off"
    )
    if tc.cuda_graphs == "on" and not cuda_graphs:
        raise UserError(
            "--cuda_graphs on needs torch.compile (--compile on or auto) on one CUDA device "
            f"without DDP (here: device {device}, --compile {tc.compile}, world size {d.world})"
        )
    dataset: Dataset = load_dataset(tc.data_dir)
    if state is not None and state.get("vocab") != dataset.vocab.token_to_id:
        raise UserError(
            f"{resume_path}: the checkpoint's vocabulary does not match {tc.data_dir}/vocab.json"
        )
    train_split = dataset.train
    global_batch = tc.batch_size * d.world
    spe = steps_per_epoch(len(train_split), global_batch, tc.data_dir)
    max_steps = tc.max_steps or (tc.num_epochs * spe if tc.num_epochs else tc.total_steps_default)
    start_step = int(state["step"]) if state is not None else 0
    if start_step >= max_steps and resume_from == "latest":
        # a requeued or resubmitted job of a finished run: nothing to do, and not an error
        if d.main:
            print(
                f"{resume_path}: the run is already at step {start_step} (--max_steps {max_steps})"
            )
        return output_dir
    if start_step >= max_steps:
        raise UserError(f"the run is already at step {start_step} >= --max_steps {max_steps}")
    torch.manual_seed(tc.seed)
    model = build_model(
        config.model, oc, dataset.vocab, dataset.entity_len, train_seq=train_split.seq
    ).to(device)

    if d.main:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir.mkdir(exist_ok=True)
        lock = RunLock(output_dir)  # noqa: F841  (held for the life of the run)
        remove_stale_temporaries(ckpt_dir)
        write_run_state(output_dir, "running", start_step, max_steps, None)
    setup_logging(output_dir if d.main else None, d.main)
    precision = resolve_precision(tc.precision, device, log.warning)
    if tc.max_steps is not None and tc.num_epochs is not None:
        log.info(f"--max_steps {tc.max_steps} given: it wins over --num_epochs {tc.num_epochs}")

    optimizer = torch.optim.AdamW(
        param_groups(model, tc.weight_decay),
        lr=tc.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=True,  # one kernel for all parameters; also lets a non-finite step be skipped
    )
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
    best_mrr = -math.inf
    if state is not None:
        model.load_hf_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer_state_dict"])
        if state.get("scaler_state_dict"):
            scaler.load_state_dict(state["scaler_state_dict"])
        best_mrr = float(state.get("best_mrr", -math.inf))
        torch.set_rng_state(state["rng_state"]["cpu"])
        if device.type == "cuda" and state["rng_state"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng_state"]["cuda"], device)

    n_params = sum(p.numel() for p in model.parameters())
    resolved = config.to_dict()
    resolved["resolved"] = {
        "max_steps": max_steps,
        "steps_per_epoch": spe,
        "world_size": d.world,
        "global_batch_size": global_batch,
        "precision": precision,
        "compile": use_compile,
        "cuda_graphs": cuda_graphs,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "parameters": n_params,
    }
    metrics_path = output_dir / "metrics.jsonl"
    if d.main:
        (output_dir / "training_args.json").write_text(json.dumps(resolved, indent=2) + "\n")
        _truncate_metrics(metrics_path, start_step)
        n_ckpt = len(
            [
                s
                for s in checkpoint_steps(
                    max_steps, tc.save_steps, tc.save_step_dense, tc.save_step_dense_interval
                )
                if s > start_step
            ]
        )
        cpu_note = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
        log.info(
            f"device {device}{cpu_note} | precision {precision} | world size {d.world} | "
            f"parameters {n_params:,}"
        )
        log.info(
            f"train items {len(train_split):,} | batch {tc.batch_size} per process, global "
            f"{global_batch} | steps per epoch {spe:,} | max steps {max_steps:,} "
            f"(~{max_steps / spe:.1f} epochs) | {n_ckpt} checkpoints to write"
        )
        if state is not None:
            log.info(f"resumed from {resume_path} at step {start_step}")
            _warn_thread_change(state, device)
        log.info(f"output: {output_dir}")

    seq_all = train_split.seq.to(device)
    # kinds and the permutation stay on the host: the model plans each batch's packing from
    # them there, so a GPU step never waits for a device-to-host copy (see GPT2Jepa.prepare)
    kind_all = train_split.kind
    valid_split = dataset.valid[tc.valid_split]
    perms: dict[int, torch.Tensor] = {}

    def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This rank's (sequences, kinds, loss-dropout keep) of a step: a tensor index."""
        epoch, pos = divmod(step, spe)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = epoch_permutation(tc.seed, epoch, len(train_split))
        global_idx = perms[epoch][pos * global_batch : (pos + 1) * global_batch]
        local_idx = global_idx[d.rank * tc.batch_size : (d.rank + 1) * tc.batch_size]
        keep = None
        if oc.loss_dropout > 0:
            keep = loss_dropout_keep(tc.seed, step, global_batch, oc.loss_dropout)
            keep = keep[d.rank * tc.batch_size : (d.rank + 1) * tc.batch_size]
            keep = to_device(keep, device)
        return seq_all[to_device(local_idx, device)], kind_all[local_idx], keep

    run_model: torch.nn.Module = model
    if use_compile:
        run_model = compiled_or_eager(
            compile_model(model, cuda_graphs),
            model,
            batch_at(start_step),
            oc,
            precision,
            device,
            d.world,
            log.warning,
            # CUDA graphs are recorded at the second call: probe that too
            probe_steps=2 if cuda_graphs else 1,
        )
    if d.enabled:  # after the probe: DDP's hooks must belong to the module that trains
        run_model = torch.nn.parallel.DistributedDataParallel(
            run_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    params = [p for p in model.parameters() if p.requires_grad]
    bad_run = 0
    # Sums of the current log window (this rank's share of the global ntp, jepa means); saved in
    # checkpoints so that a resumed run writes exactly the records of an uninterrupted one.
    running = torch.zeros(2, device=device)
    steps_in_window = 0
    if state is not None and "log_window" in state:
        steps_in_window = int(state["log_window"]["steps"])
        if d.main:
            running += state["log_window"]["sums"].to(device)

    def snapshot(window_sums: torch.Tensor) -> dict[str, Any]:
        out = _state(
            model, optimizer, scaler, config, dataset, step, spe, best_mrr, device, d.world
        )
        out["log_window"] = {"sums": window_sums.detach().cpu(), "steps": steps_in_window}
        return out

    t_last, step_last = time.perf_counter(), start_step
    progress = _progress(d.main, start_step, max_steps)

    step = start_step
    while step < max_steps:
        # ---- batch: a tensor index into the data (sequences on the device, kinds on the host)
        seq, kind, keep = batch_at(step)
        lr = tc.learning_rate * lr_multiplier(step, tc.warmup_steps, max_steps, tc.scheduler)
        res = train_step(
            run_model,
            optimizer,
            scaler,
            params,
            seq,
            kind,
            keep,
            lr,
            oc,
            precision,
            device,
            d.world,
            tc.max_grad_norm,
            step + 1,
        )
        out, loss, ntp, jepa, grad_norm, bad = (
            res.out,
            res.loss,
            res.ntp,
            res.jepa,
            res.grad_norm,
            res.bad,
        )
        step += 1
        running += torch.stack([ntp, jepa]).float()
        steps_in_window += 1

        # ---- non-finite guard: checked every step on CPU (free), at log steps on GPU
        if device.type == "cpu" or step % tc.log_interval == 0:
            bad_run = bad_run + 1 if bool(bad) else 0
            if bad_run >= tc.max_bad_steps:
                latest = find_latest_valid(ckpt_dir) if d.main else None
                raise UserError(
                    f"stopping at step {step}: {bad_run} consecutive non-finite steps (loss "
                    f"{float(loss):.4g}, grad norm {float(grad_norm):.4g}); last good checkpoint: "
                    f"{latest[0] if latest else 'none'}"
                )
        if progress is not None:
            progress.update(1)

        # ---- logging, evaluation, checkpoints
        record: dict[str, Any] = {}
        if step % tc.log_interval == 0 or step == max_steps:
            if d.enabled:
                dist.all_reduce(running)
            ntp_mean, jepa_mean = (running / steps_in_window).tolist()
            total = oc.gamma_ntp * ntp_mean + (oc.lambda_jepa * jepa_mean if oc.jepa_active else 0)
            now = time.perf_counter()
            record.update(
                step=step,
                epoch=step / spe,
                lr=lr,
                loss=total,
                ntp_loss=ntp_mean,
                jepa_loss=jepa_mean,
                grad_norm=float(grad_norm),
                steps_per_s=(step - step_last) / max(now - t_last, 1e-9),
            )
            pred = out.jepa_embeddings()
            if pred is not None:
                record.update({k: float(v) for k, v in collapse_signal(pred).items()})
            running.zero_()
            steps_in_window = 0
            t_last, step_last = now, step
        if should_eval(step, tc.eval_steps, max_steps):
            if d.main:
                metrics = evaluate_split(model, valid_split, tc.eval_batch_size)
                record.update(
                    step=step,
                    epoch=step / spe,
                    **{f"eval_{tc.valid_split}_{k}": v for k, v in metrics.items()},
                )
                if metrics[model.headline_metric] > best_mrr:
                    best_mrr = metrics[model.headline_metric]
                    # (under DDP its log window holds rank 0's share only; resume from
                    # checkpoint_step_*.pt for exact metrics)
                    save_checkpoint(ckpt_dir / "best_model.pt", snapshot(running))
            if d.enabled:
                best = torch.tensor([best_mrr], device=device, dtype=torch.float64)
                dist.broadcast(best, 0)
                best_mrr = float(best)
        if record and d.main:
            append_jsonl(metrics_path, record)
            _log_record(record, progress, tc.valid_split)
        stop = preempt.signal is not None
        if d.enabled and (step % min(tc.log_interval, 10) == 0 or step == max_steps):
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        elif d.enabled:
            stop = False  # ranks agree on stopping only at synchronised steps
        if (
            should_save(
                step, tc.save_steps, tc.save_step_dense, tc.save_step_dense_interval, max_steps
            )
            or stop
        ):
            window = running.clone()
            if d.enabled:
                dist.all_reduce(window)
            if d.main:
                path = ckpt_dir / f"checkpoint_step_{step}.pt"
                save_checkpoint(path, snapshot(window))
                log.info(f"saved {path}")
            if d.enabled:
                dist.barrier()
        if stop:
            log.info(
                f"received signal {preempt.signal}: checkpointed step {step}; resume with "
                "--resume_from latest"
            )
            break
    if progress is not None:
        progress.close()
    if d.main:
        done = "finished" if step == max_steps else "stopped"
        write_run_state(output_dir, done, step, max_steps, preempt.signal)
    if d.main and step == max_steps:
        log.info(f"done: {max_steps} steps; checkpoints in {ckpt_dir}; metrics in {metrics_path}")
    return output_dir


def forward_losses(run_model, seq, kind, keep, oc, precision: str, device, world: int):
    """The forward half of a step: (model output, total loss, NTP mean, JEPA mean), the means
    normalised by the GLOBAL counts so that gradients are equal whatever the world size."""
    with autocast(device, precision):
        out = run_model(seq, kind, keep)
    counts = torch.stack([out.ntp_count, out.jepa_count]).float()
    if world > 1:
        dist.all_reduce(counts)
    ntp = out.ntp_sum / counts[0].clamp(min=1)
    jepa = out.jepa_sum / counts[1].clamp(min=1)
    loss = oc.gamma_ntp * ntp + (oc.lambda_jepa * jepa if oc.jepa_active else 0.0)
    return out, loss, ntp, jepa


class CompiledLosses(torch.nn.Module):
    """A model family run with its device half (`losses`) under torch.compile; the host half
    (`prepare`: packing plans) stays eager, outside the compiled graph. Batches are prepared
    with fixed shapes, so the graph is compiled once, for static shapes, and never guards on a
    count; with `cuda_graphs` (mode reduce-overhead) every step replays one recorded CUDA
    graph for the forward and one for the backward instead of issuing ~300 kernels."""

    def __init__(self, model: torch.nn.Module, cuda_graphs: bool) -> None:
        super().__init__()
        # Inductor's coalescing tile analysis (Triton backend) failed on this model under
        # dynamic shapes (torch 2.11 on an H200: AssertionError in
        # tiling_utils.get_pw_red_splits); the shapes are static now, but keep the setting
        # that is known to work.
        import torch._inductor.config as inductor_config

        inductor_config.triton.coalesce_tiling_analysis = False
        self.model, self.cuda_graphs = model, cuda_graphs
        mode = "reduce-overhead" if cuda_graphs else None
        self.compiled_losses = torch.compile(model.losses, mode=mode, dynamic=False)

    def forward(
        self, seq: torch.Tensor, kind: torch.Tensor, jepa_keep: torch.Tensor | None = None
    ) -> Any:
        prepared = self.model.prepare(seq, kind, jepa_keep, fixed_shapes=True)
        if self.cuda_graphs:
            # a new step: the previous step's graph outputs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled_losses(*prepared)


def compile_model(model: torch.nn.Module, cuda_graphs: bool) -> torch.nn.Module:
    """The module that trains `model` compiled (see CompiledLosses)."""
    return CompiledLosses(model, cuda_graphs)


def compiled_or_eager(
    compiled: torch.nn.Module,
    eager: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    oc,
    precision: str,
    device: torch.device,
    world: int,
    warn,
    probe_steps: int = 1,
) -> torch.nn.Module:
    """Compilation is lazy, so a platform where it fails only says so at the first step: run
    `probe_steps` forward + backward passes of `compiled` on `batch` and return it if that
    works, else warn and return `eager`. Leaves no trace: the RNG states are restored and the
    gradients dropped, so the run continues exactly as it would have without the probe."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    t0 = time.perf_counter()
    try:
        for _ in range(probe_steps):
            _, loss, _, _ = forward_losses(compiled, *batch, oc, precision, device, world)
            loss.backward()
            # as train_step does: under CUDA graphs the gradients are graph outputs that the
            # next replay overwrites, so a second backward must not accumulate into them
            for p in eager.parameters():
                p.grad = None
        chosen = compiled
        log.info(f"torch.compile: the first step compiled in {time.perf_counter() - t0:.0f} s")
    except Exception as exc:  # any failure here means: do not use the compiled model
        warn(f"torch.compile failed ({one_line(exc)}): running eagerly")
        chosen = eager
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        for p in eager.parameters():
            p.grad = None
    return chosen


@dataclass
class StepResult:
    out: Any  # the model's LossOutput
    loss: torch.Tensor
    ntp: torch.Tensor
    jepa: torch.Tensor
    grad_norm: torch.Tensor
    bad: torch.Tensor  # True when the update was skipped (non-finite)


def train_step(
    run_model,
    optimizer,
    scaler,
    params,
    seq,
    kind,
    keep,
    lr: float,
    oc,
    precision: str,
    device: torch.device,
    world: int,
    max_grad_norm: float,
    step_index: int = -1,
) -> StepResult:
    """One optimizer update; no host synchronisation (the trainer and `revjepa bench` share it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    out, loss, ntp, jepa = forward_losses(run_model, seq, kind, keep, oc, precision, device, world)
    scaler.scale(loss * world).backward()  # DDP averages gradients over ranks
    if crash_requested("step", step_index):
        crash()
    scaler.unscale_(optimizer)
    clip = max_grad_norm if max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    # grad_norm is the same on every rank (gradients are all-reduced); a NaN/inf loss gives a
    # NaN/inf norm, so this one flag covers both and all ranks skip the same steps.
    bad = ~torch.isfinite(grad_norm)
    if precision == "fp16":
        scaler.step(optimizer)  # the scaler skips inf/NaN steps itself
        scaler.update()
    else:
        optimizer.found_inf = bad.float()  # the fused AdamW skips the update when set
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(out, loss.detach(), ntp.detach(), jepa.detach(), grad_norm, bad)


def _state(
    model,
    optimizer,
    scaler,
    config: RunConfig,
    dataset: Dataset,
    step: int,
    spe: int,
    best_mrr: float,
    device: torch.device,
    world_size: int,
) -> dict[str, Any]:
    return {
        "model_state_dict": model.hf_state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": {"name": config.train.scheduler, "last_step": step},
        "scaler_state_dict": scaler.state_dict() if scaler.is_enabled() else {},
        "step": step,
        "epoch": step // spe,
        "batch_in_epoch": step % spe,
        "best_mrr": best_mrr,
        "rng_state": {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        },
        "config": config.to_dict(),
        "family": config.model.family,
        "vocab": dataset.vocab.token_to_id,
        "entity_len": dataset.entity_len,
        "world_size": world_size,
        "cpu_threads": torch.get_num_threads(),
    }


def _warn_thread_change(state: dict[str, Any], device: torch.device) -> None:
    """CPU kernels (LayerNorm's backward among them) split their sums by thread, so a resume
    continues bit-identically only with the thread count the checkpoint was written with."""
    saved, now = state.get("cpu_threads"), torch.get_num_threads()
    if device.type == "cpu" and saved is not None and int(saved) != now:
        log.warning(
            f"resuming with {now} CPU threads, the checkpoint was written with {saved}: training "
            f"continues correctly, but not bit-identically to an uninterrupted run "
            f"(set OMP_NUM_THREADS={saved} for that)"
        )


def _truncate_metrics(path: Path, start_step: int) -> None:
    """Drop records past the resumed step and any half-written line (exact metrics after resume)."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= start_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _progress(main: bool, start: int, total: int):
    if not main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def _log_record(record: dict[str, Any], progress, valid_split: str) -> None:
    parts = [f"step {record['step']}"]
    for key in ("loss", "ntp_loss", "jepa_loss", "lr", "steps_per_s", "pred_mean_cos"):
        if key in record:
            parts.append(f"{key} {record[key]:.4g}")
    mrr_key = f"eval_{valid_split}_mrr"
    if mrr_key in record:
        parts.append(f"{valid_split} mrr {record[mrr_key]:.4f}")
    line = " | ".join(parts)
    if progress is not None:
        progress.set_postfix_str(f"loss {record.get('loss', float('nan')):.4g}", refresh=False)
    log.info(line)
