"""More than one node: two torchrun agents (each its own process, as on two hosts) meet through a
c10d rendezvous on a loopback address and train as one 2-process job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from revjepa.data import GenConfig, generate, write_generated

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ARGS = [
    *("--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--dropout", "0"),
    *("--learning_rate", "1e-3", "--seed", "5", "--device", "cpu"),
    *("--max_steps", "10", "--save_step_dense", "0", "--save_steps", "5"),
    *("--save_step_dense_interval", "5", "--eval_steps", "5", "--log_interval", "5"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("REVJEPA_", "SLURM_"))}
    # loopback only: the agents' own address and gloo's interface
    e.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return e


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "checkpoint_step_10.pt", weights_only=True)[
        "model_state_dict"
    ]


def test_two_torchrun_agents_match_one_process(tmp_path):
    data = tmp_path / "data"
    write_generated(generate(GenConfig(num_ga_entities=200, num_rel_pairs=2, test_size=40)), data)
    port = free_port()
    # each agent gets its own output directory: rank 0 (whichever agent the rendezvous makes
    # node 0) must write everything, the other agent nothing
    agents = []
    for name in ("a", "b"):
        cmd = [
            TORCHRUN,
            *("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d"),
            *("--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "revjepa-test"),
            *("--local_addr", "127.0.0.1", "--max_restarts", "0"),
            "train_jepa.py",
            *("--data_dir", str(data), "--output_dir", str(tmp_path / name), "--batch_size", "8"),
            *ARGS,
        ]
        agents.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=300) for p in agents]
    for p, (_out, err) in zip(agents, outputs):
        assert p.returncode == 0, err[-3000:]
    one = subprocess.run(
        [sys.executable, "train_jepa.py", "--data_dir", str(data), "--output_dir"]
        + [str(tmp_path / "one"), "--batch_size", "16", *ARGS],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr

    written = [name for name in ("a", "b") if (tmp_path / name).exists()]
    assert len(written) == 1, written
    two = tmp_path / written[0]
    resolved = json.loads((two / "training_args.json").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["global_batch_size"] == 16
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [
        "best_model.pt",
        "checkpoint_step_10.pt",
        "checkpoint_step_5.pt",
    ]
    steps = [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10]
    a, b = weights(two), weights(tmp_path / "one")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5
