"""The step-based trainer (one process or torchrun/srun DDP).

`setup_run` resolves the device, data, model, optimizer, checkpointer and logging into a `Run`;
`Trainer.fit` runs its loop: step -> log -> maybe evaluate -> maybe save -> maybe stop. Step N
means N optimizer updates done; the batch of a step is a pure function of (seed, step)
(`data.BatchSampler`), so resuming needs only the step and the state in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpointer, find_latest_valid, load_checkpoint
from .collapse import CollapseAlarm
from .compiled import compile_model, compiled_or_eager, with_model
from .config import RunConfig, resolve_config
from .cpu import setup_cpu_kernels, uses_cpu_kernels
from .data import BatchSampler, Dataset, Split, load_dataset, training_pool
from .distributed import Dist, init_distributed, launcher_world_size
from .errors import UserError
from .evaluate import evaluate_split
from .families import build_model
from .families.base import collapse_signal
from .flops import peak_flops
from .ops import step_ops
from .runlog import (
    RunLock,
    append_jsonl,
    failure_recorded,
    loss_term_keys,
    truncate_jsonl,
    write_run_state,
)
from .schedule import lr_multiplier, should_eval
from .step import StepContext, StepResult, make_optimizer, resolve_precision, train_step
from .tracking import Tracker, check_backends, open_tracker

log = logging.getLogger("revjepa.train")


# ----------------------------------------------------------------------------- small pieces


def resolve_device(requested: str, d: Dist) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


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


def close_logging() -> None:
    """Close and remove the handlers of `setup_logging` (the end of a run)."""
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


# ----------------------------------------------------------------------------- run set-up


def find_resume_state(
    output_dir: Path, resume_from: str | None
) -> tuple[dict[str, Any] | None, Path | None]:
    """The checkpoint to resume from (loaded and verified), or (None, None) for a fresh start:
    no --resume_from, or `latest` in a directory without a valid checkpoint (requeue-safe)."""
    if resume_from is None:
        return None, None
    if resume_from == "latest":
        found = find_latest_valid(output_dir / "checkpoints")
        if found is None:
            return None, None
        path, state = found
        return state, path
    return load_checkpoint(resume_from), Path(resume_from)


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


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything a training run is made of, built once by `setup_run`."""

    config: RunConfig
    dist: Dist
    device: torch.device
    dataset: Dataset
    model: torch.nn.Module  # the family's model (what checkpoints and evaluation see)
    ctx: StepContext  # the module that trains (compiled / DDP), optimizer, precision, ...
    sampler: BatchSampler
    checkpointer: Checkpointer
    output_dir: Path
    max_steps: int
    steps_per_epoch: int
    start_step: int
    state: dict[str, Any] | None  # the checkpoint resumed from
    lock: RunLock | None = None  # held for the life of the run (main process)
    peak_flops: float = math.inf  # per device, for the MFU of the log records
    peak_source: str = ""

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"


def train(
    config: RunConfig,
    overrides: dict[str, dict[str, Any]] | None = None,
    resume_from: str | None = None,
) -> Path:
    """Train (or resume) a run; returns the output directory."""
    state, resume_path = find_resume_state(Path(config.train.output_dir), resume_from)
    config = resolve_config(
        config, overrides or {}, state, resume_path, resume_from, launcher_world_size()
    )
    tc = config.train
    check_backends(tc.report_to)  # a missing tracker package: exit 2 before any file is written
    d = init_distributed("cuda" if (tc.device != "cpu" and torch.cuda.is_available()) else "cpu")
    preempt = Preemption()
    try:
        return _setup_and_fit(config, state, resume_path, d, resume_from, preempt)
    finally:
        preempt.restore()
        close_logging()
        d.close()


def print_resolved_config(
    config: RunConfig, overrides: dict[str, dict[str, Any]], resume_from: str | None
) -> None:
    """`--print_config`: the configuration a run would use (with a checkpoint's on resume)."""
    state, resume_path = find_resume_state(Path(config.train.output_dir), resume_from)
    resolved = resolve_config(config, overrides, state, resume_path, resume_from, 1)
    print(json.dumps(resolved.to_dict(), indent=2))


def _setup_and_fit(
    config: RunConfig,
    state: dict[str, Any] | None,
    resume_path: Path | None,
    d: Dist,
    resume_from: str | None,
    preempt: Preemption,
) -> Path:
    """The run lives in this frame only: its DDP wrapper, lock and tensors are gone when it
    returns, before the caller destroys the process group (a DDP module that outlived its
    process group made a 2-process run hang at exit, about one run in six)."""
    run = setup_run(config, state, resume_path, d, resume_from)
    if run is None:
        return Path(config.train.output_dir)
    return Trainer(run, preempt).fit()


def setup_run(
    config: RunConfig,
    state: dict[str, Any] | None,
    resume_path: Path | None,
    d: Dist,
    resume_from: str | None,
) -> Run | None:
    """Build the run; None when `--resume_from latest` finds it already finished. Everything
    that can reject the input runs before the first file is created or touched."""
    tc = config.train
    output_dir = Path(tc.output_dir)
    if d.main:
        check_output_dir(output_dir, resume_from is not None)
    device = resolve_device(tc.device, d)
    use_compile, cuda_graphs = _compile_choice(config, device, d)
    dataset = load_dataset(tc.data_dir)
    if state is not None and state.get("vocab") != dataset.vocab.token_to_id:
        raise UserError(
            f"{resume_path}: the checkpoint's vocabulary does not match {tc.data_dir}/vocab.json"
        )
    # what the sampler draws from (the model's entity table stays the data's own entities)
    pool = training_pool(dataset.train, dataset.entity_len, tc.reverse_training)
    spe = steps_per_epoch(len(pool), tc.batch_size * d.world, tc.data_dir)
    max_steps = tc.max_steps or (tc.num_epochs * spe if tc.num_epochs else tc.total_steps_default)
    start_step = int(state["step"]) if state is not None else 0
    if start_step >= max_steps and resume_from == "latest":
        # a requeued or resubmitted job of a finished run: nothing to do, and not an error
        if d.main:
            print(
                f"{resume_path}: the run is already at step {start_step} (--max_steps {max_steps})"
            )
        return None
    if start_step >= max_steps:
        raise UserError(f"the run is already at step {start_step} >= --max_steps {max_steps}")
    torch.manual_seed(tc.seed)
    model = build_model(
        config.model, config.objective, dataset.vocab, dataset.entity_len,
        train_seq=dataset.train.seq,
    ).to(device)  # fmt: skip
    checkpointer = Checkpointer(output_dir / "checkpoints", tc, max_steps, d.main)
    lock = None
    if d.main:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpointer.prepare()
        lock = RunLock(output_dir)
        write_run_state(output_dir, "running", start_step, max_steps, None)
    with failure_recorded(output_dir if d.main else None, lambda: start_step, max_steps, lock):
        return _build_run(config, state, resume_path, d, dataset, pool, model, checkpointer, lock)


def _build_run(
    config: RunConfig,
    state: dict[str, Any] | None,
    resume_path: Path | None,
    d: Dist,
    dataset: Dataset,
    pool: Split,
    model: torch.nn.Module,
    checkpointer: Checkpointer,
    lock: RunLock | None,
) -> Run:
    """The rest of `setup_run`, once the directory is this run's (a failure here is recorded
    in run_state.json)."""
    tc, output_dir = config.train, Path(config.train.output_dir)
    device = next(model.parameters()).device  # where setup_run put it
    start_step = int(state["step"]) if state is not None else 0
    spe = steps_per_epoch(len(pool), tc.batch_size * d.world, tc.data_dir)
    max_steps = checkpointer.max_steps
    use_compile, cuda_graphs = _compile_choice(config, device, d)
    setup_logging(output_dir if d.main else None, d.main)
    model.ops = step_ops(device, use_compile)  # once, here: plain torch ops by default
    setup_cpu_kernels(model, tc.cpu_kernels, device, use_compile, d, log.warning)
    precision = resolve_precision(tc.precision, device, log.warning)
    if tc.max_steps is not None and tc.num_epochs is not None:
        log.info(f"--max_steps {tc.max_steps} given: it wins over --num_epochs {tc.num_epochs}")
    optimizer = make_optimizer(model, tc.learning_rate, tc.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
    params = [p for p in model.parameters() if p.requires_grad]
    ctx = StepContext(
        model, optimizer, scaler, params, config.objective, precision, device, d.world,
        tc.max_grad_norm,
    )  # fmt: skip
    if state is not None:
        _restore(state, ctx, checkpointer)
    sampler = BatchSampler(
        pool, seed=tc.seed, batch_size=tc.batch_size, rank=d.rank, world=d.world,
        steps_per_epoch=spe, loss_dropout=config.objective.loss_dropout, device=device,
    )  # fmt: skip
    run = Run(
        config, d, device, dataset, model, ctx, sampler, checkpointer, output_dir, max_steps,
        spe, start_step, state, lock,
    )  # fmt: skip
    run.peak_flops, run.peak_source = peak_flops(device, precision, tc.peak_tflops)
    _announce(run, resume_path, use_compile, cuda_graphs)
    _wrap_model(run, use_compile, cuda_graphs)
    return run


def _compile_choice(config: RunConfig, device: torch.device, d: Dist) -> tuple[bool, bool]:
    tc = config.train
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
    return use_compile, cuda_graphs


def _restore(state: dict[str, Any], ctx: StepContext, checkpointer: Checkpointer) -> None:
    """Weights, optimizer, scaler, best metric and RNG state of the checkpoint resumed from."""
    ctx.run_model.load_hf_state_dict(state["model_state_dict"])
    ctx.optimizer.load_state_dict(state["optimizer_state_dict"])
    if state.get("scaler_state_dict"):
        ctx.scaler.load_state_dict(state["scaler_state_dict"])
    checkpointer.best = float(state.get("best_mrr", -math.inf))
    torch.set_rng_state(state["rng_state"]["cpu"])
    if ctx.device.type == "cuda" and state["rng_state"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng_state"]["cuda"], ctx.device)


def _announce(run: Run, resume_path: Path | None, use_compile: bool, cuda_graphs: bool) -> None:
    """`training_args.json` (the resolved configuration), metrics cut back to the resumed
    step, and the start-up log lines (main process)."""
    d, device, tc = run.dist, run.device, run.config.train
    precision, global_batch = run.ctx.precision, run.sampler.global_batch
    n_params = sum(p.numel() for p in run.model.parameters())
    resolved = run.config.to_dict()
    resolved["resolved"] = {
        "max_steps": run.max_steps,
        "steps_per_epoch": run.steps_per_epoch,
        "world_size": d.world,
        "global_batch_size": global_batch,
        "precision": precision,
        "compile": use_compile,
        "cuda_graphs": cuda_graphs,
        "cpu_kernels": uses_cpu_kernels(run.model),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "parameters": n_params,
        "peak_flops": run.peak_flops,
        "peak_flops_source": run.peak_source,
        # the family's, so that tools reading run files (status, report) need no model class
        "headline_metric": run.model.headline_metric,
        "comparable_metric": run.model.comparable_metric,
        "loss_terms": list(run.model.loss_terms),
    }
    if not d.main:
        return
    (run.output_dir / "training_args.json").write_text(json.dumps(resolved, indent=2) + "\n")
    truncate_jsonl(run.metrics_path, run.start_step)
    cpu_note = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    log.info(
        f"device {device}{cpu_note} | precision {precision} | world size {d.world} | "
        f"parameters {n_params:,}"
    )
    spe, max_steps = run.steps_per_epoch, run.max_steps
    reversed_note = ""
    if tc.reverse_training != "none":
        reversed_note = f" (+ {len(run.dataset.train):,} reversed, {tc.reverse_training})"
    log.info(
        f"train items {len(run.dataset.train):,}{reversed_note} | batch {tc.batch_size} per "
        f"process, global {global_batch} | steps per epoch {spe:,} | max steps {max_steps:,} "
        f"(~{max_steps / spe:.1f} epochs) | {run.checkpointer.planned_after(run.start_step)} "
        "checkpoints to write"
    )
    if run.state is not None:
        log.info(f"resumed from {resume_path} at step {run.start_step}")
        _warn_thread_change(run.state, device)
    log.info(f"output: {run.output_dir}")


def _wrap_model(run: Run, use_compile: bool, cuda_graphs: bool) -> None:
    """The module that trains: compiled (after a probe that may fall back to eager), then DDP."""
    model, ctx = run.model, run.ctx
    if use_compile:
        compiled = with_model(ctx, compile_model(model, cuda_graphs))
        batch = run.sampler.batch(run.start_step)
        # CUDA graphs are recorded at the second call: probe that too
        chosen = compiled_or_eager(compiled, model, batch, log.warning, 2 if cuda_graphs else 1)
        run.ctx = ctx = with_model(ctx, chosen)
    if run.dist.enabled:  # after the probe: DDP's hooks must belong to the module that trains
        device = run.device
        ddp = torch.nn.parallel.DistributedDataParallel(
            ctx.run_model, device_ids=[device.index] if device.type == "cuda" else None
        )
        run.ctx = with_model(ctx, ddp)


# ----------------------------------------------------------------------------- the loop


# The log window of checkpoints written before the families named their loss terms.
LEGACY_WINDOW_TERMS = ("ntp", "jepa")


class LogWindow:
    """Sums of the current log window (this rank's share of the global mean of each of the
    family's named loss terms) and its step count; saved in checkpoints so that a resumed run
    writes exactly the records of an uninterrupted one."""

    def __init__(self, terms: tuple[str, ...], device: torch.device) -> None:
        self.terms = tuple(terms)
        self.sums = torch.zeros(len(self.terms), device=device)
        self.steps = 0

    def add(self, res: StepResult) -> None:
        self.sums += torch.stack([res.terms[name] for name in self.terms]).float()
        self.steps += 1

    def means(self, sums: torch.Tensor) -> dict[str, float]:
        """The window's mean of each term, from its sums (all ranks' where all-reduced)."""
        return dict(zip(self.terms, (sums / self.steps).tolist()))

    def state_dict(self, sums: torch.Tensor) -> dict[str, Any]:
        return {"terms": list(self.terms), "sums": sums.detach().cpu(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any], main: bool) -> None:
        stored = tuple(state.get("terms", LEGACY_WINDOW_TERMS))
        missing = [name for name in self.terms if name not in stored]
        if missing:
            raise UserError(
                f"the checkpoint's log window has the loss terms {list(stored)}, not {missing}: "
                "it was written by another model setup"
            )
        self.steps = int(state["steps"])
        if main:
            # an older checkpoint may hold a term this family no longer logs (an NTP of 0)
            picked = state["sums"][[stored.index(name) for name in self.terms]]
            self.sums += picked.to(self.sums.device)


class Trainer:
    """Runs a `Run` from its start step to --max_steps (or to a stop signal)."""

    def __init__(self, run: Run, preempt: Preemption) -> None:
        self.run, self.preempt = run, preempt
        self.step = run.start_step
        self.window = LogWindow(run.model.loss_terms, run.device)
        if run.state is not None and "log_window" in run.state:
            self.window.load_state_dict(run.state["log_window"], run.dist.main)
        tc = run.config.train
        self.alarm = CollapseAlarm(tc.collapse_cos_threshold, tc.collapse_window)
        if run.state is not None and "collapse_alarm" in run.state:
            self.alarm.load_state_dict(run.state["collapse_alarm"])
        # no backends until fit opens them; the W&B run id travels on through every checkpoint
        self.tracker = Tracker([], (run.state or {}).get("wandb_run_id"))
        self.bad_run = 0
        self.t_last, self.step_last = time.perf_counter(), run.start_step
        self.window_tokens, self.window_flops = 0, 0.0  # this rank's, since t_last
        self.progress = _progress(run.dist.main, run.start_step, run.max_steps)

    def fit(self) -> Path:
        """Train to --max_steps or a stop signal; an exception is recorded in run_state.json
        (failed, with its line) and re-raised."""
        run = self.run
        main_dir = run.output_dir if run.dist.main else None
        with failure_recorded(main_dir, self._step, run.max_steps, run.lock):
            if run.dist.main:
                self.tracker = open_tracker(run.config, run.output_dir, run.start_step, run.state)
            try:
                self._loop()
            except BaseException:
                self.tracker.close(ok=False)
                raise
            self.tracker.close(ok=True)
            self.finish()
        return run.output_dir

    def _step(self) -> int:
        return self.step

    def _loop(self) -> None:
        run, tc = self.run, self.run.config.train
        while self.step < run.max_steps:
            res = self.train_one_step()
            self.guard_non_finite(res)
            record = self.log_record(res) if self._log_due() else {}
            if should_eval(self.step, tc.eval_steps, run.max_steps):
                record.update(self.evaluate())
            if record and run.dist.main:
                append_jsonl(run.metrics_path, record)
                self.tracker.log(record)
                _log_record(record, self.progress, tc.valid_split)
            stop = self.should_stop()
            if stop or run.checkpointer.due(self.step):
                self.save()
            if stop:
                log.info(
                    f"received signal {self.preempt.signal}: checkpointed step {self.step}; "
                    "resume with --resume_from latest"
                )
                break

    def train_one_step(self) -> StepResult:
        run, tc = self.run, self.run.config.train
        batch = run.sampler.batch(self.step)
        lr = tc.learning_rate * lr_multiplier(
            self.step, tc.warmup_steps, run.max_steps, tc.scheduler
        )
        res = train_step(run.ctx, batch, lr, self.step + 1)
        cost = run.model.step_cost(batch.kind)  # host arithmetic on the host-side kinds
        self.window_tokens += cost.tokens
        self.window_flops += cost.flops
        self.lr = lr
        self.step += 1
        self.window.add(res)
        if self.progress is not None:
            self.progress.update(1)
        return res

    def guard_non_finite(self, res: StepResult) -> None:
        """Checked every step on CPU (free), at log steps on GPU (a host sync)."""
        run, tc = self.run, self.run.config.train
        if run.device.type != "cpu" and self.step % tc.log_interval != 0:
            return
        self.bad_run = self.bad_run + 1 if bool(res.bad) else 0
        if self.bad_run >= tc.max_bad_steps:
            latest = find_latest_valid(run.checkpointer.dir) if run.dist.main else None
            raise UserError(
                f"stopping at step {self.step}: {self.bad_run} consecutive non-finite steps (loss "
                f"{float(res.loss):.4g}, grad norm {float(res.grad_norm):.4g}); last good "
                f"checkpoint: {latest[0] if latest else 'none'}"
            )

    def _log_due(self) -> bool:
        return (
            self.step % self.run.config.train.log_interval == 0 or self.step == self.run.max_steps
        )

    def log_record(self, res: StepResult) -> dict[str, Any]:
        """The training record of a log step: the window's means over all ranks, lr, speed."""
        run = self.run
        means = self.window.means(run.dist.all_reduce_sum(self.window.sums))
        now = time.perf_counter()
        record: dict[str, Any] = dict(
            step=self.step,
            epoch=self.step / run.steps_per_epoch,
            lr=self.lr,
            loss=run.config.objective.total(means),
            **{f"{name}_loss": mean for name, mean in means.items()},
            grad_norm=float(res.grad_norm),
            steps_per_s=(self.step - self.step_last) / max(now - self.t_last, 1e-9),
            # every rank's batch costs about what rank 0's does: x world for the job
            tokens_per_s=self.window_tokens * run.dist.world / max(now - self.t_last, 1e-9),
            mfu=self.window_flops / max(now - self.t_last, 1e-9) / run.peak_flops,
        )
        pred = res.out.jepa_embeddings()
        if pred is not None:
            record.update({k: float(v) for k, v in collapse_signal(pred).items()})
            warning = self.alarm.observe(record)
            if warning and run.dist.main:
                log.warning(warning)
        self.window.sums.zero_()
        self.window.steps = 0
        self.t_last, self.step_last = now, self.step
        self.window_tokens, self.window_flops = 0, 0.0
        return record

    def evaluate(self) -> dict[str, Any]:
        """Evaluation of the validation split on the main process; a new best is saved as
        `best_model.pt` (under DDP its log window holds rank 0's share only: resume from
        checkpoint_step_*.pt for exact metrics)."""
        run, tc, record = self.run, self.run.config.train, {}
        ck = run.checkpointer
        if run.dist.main:
            metrics = evaluate_split(
                run.model, run.dataset.valid[tc.valid_split], tc.eval_batch_size,
                entity_mrr=tc.eval_entity_mrr == "on",
            )  # fmt: skip
            record = dict(
                step=self.step,
                epoch=self.step / run.steps_per_epoch,
                **{f"eval_{tc.valid_split}_{k}": v for k, v in metrics.items()},
            )
            if ck.improves(metrics[run.model.headline_metric]):
                ck.save_best(self.snapshot(self.window.sums))
        ck.best = run.dist.broadcast_from_main(ck.best, run.device)
        return record

    def should_stop(self) -> bool:
        """A stop signal, agreed by all ranks at synchronised steps only."""
        run, stop = self.run, self.preempt.signal is not None
        if not run.dist.enabled:
            return stop
        if self.step % min(run.config.train.log_interval, 10) == 0 or self.step == run.max_steps:
            return run.dist.any_rank(stop, run.device)
        return False

    def save(self) -> None:
        run = self.run
        window = run.dist.all_reduce_sum(self.window.sums.clone())
        if run.dist.main:
            path = run.checkpointer.save_step(self.step, self.snapshot(window))
            log.info(f"saved {path}")
        run.dist.barrier()

    def snapshot(self, window_sums: torch.Tensor) -> dict[str, Any]:
        """The checkpoint of the current state (key order as ever: files stay bit-identical)."""
        run, ctx = self.run, self.run.ctx
        step, spe, device = self.step, run.steps_per_epoch, run.device
        return {
            "model_state_dict": run.model.hf_state_dict(),
            "optimizer_state_dict": ctx.optimizer.state_dict(),
            "scheduler_state_dict": {"name": run.config.train.scheduler, "last_step": step},
            "scaler_state_dict": ctx.scaler.state_dict() if ctx.scaler.is_enabled() else {},
            "step": step,
            "epoch": step // spe,
            "batch_in_epoch": step % spe,
            "best_mrr": run.checkpointer.best,
            "rng_state": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "config": run.config.to_dict(),
            "family": run.config.model.family,
            "vocab": run.dataset.vocab.token_to_id,
            "entity_len": run.dataset.entity_len,
            "world_size": run.dist.world,
            "cpu_threads": torch.get_num_threads(),
            "log_window": self.window.state_dict(window_sums),
            "collapse_alarm": self.alarm.state_dict(),
            # only where a W&B run exists: other runs' checkpoints keep their content
            **({"wandb_run_id": w} if (w := self.tracker.wandb_run_id) else {}),
            **run.model.checkpoint_extras(),  # gpt2_jepa: its entity table (`entities`)
        }

    def finish(self) -> None:
        run = self.run
        if self.progress is not None:
            self.progress.close()
        if not run.dist.main:
            return
        done = "finished" if self.step == run.max_steps else "stopped"
        write_run_state(run.output_dir, done, self.step, run.max_steps, self.preempt.signal)
        if (summary := self.alarm.summary()) is not None:
            log.warning(summary)
        if self.step == run.max_steps:
            log.info(
                f"done: {run.max_steps} steps; checkpoints in {run.checkpointer.dir}; metrics in "
                f"{run.metrics_path}"
            )


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


def _progress(main: bool, start: int, total: int):
    if not main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def _log_record(record: dict[str, Any], progress, valid_split: str) -> None:
    parts = [f"step {record['step']}"]
    for key in ("loss", *loss_term_keys([record]), "lr", "steps_per_s", "mfu", "pred_mean_cos"):
        if key in record:
            parts.append(f"{key} {record[key]:.4g}")
    mrr_key = f"eval_{valid_split}_mrr"
    if mrr_key in record:
        parts.append(f"{valid_split} mrr {record[mrr_key]:.4f}")
    line = " | ".join(parts)
    if progress is not None:
        progress.set_postfix_str(f"loss {record.get('loss', float('nan')):.4g}", refresh=False)
    log.info(line)
