"""A third model family, defined here, trains, resumes, evaluates and reports through the
registry alone: the proof that adding a family touches no trainer or evaluator file (only the
registry, `families.FAMILIES`, and the family-name list of the config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revjepa import config as config_module
from revjepa.cli import main
from revjepa.data import Split, load_dataset
from revjepa.families import FAMILIES
from revjepa.families.base import LossFamily, LossOutput
from revjepa.flops import StepCost
from revjepa.metrics import item_metrics, summarise
from revjepa.status import collect_status

ARGS = [
    *("--model_family", "bag_ntp", "--n_embd", "16", "--n_head", "2", "--batch_size", "16"),
    *("--learning_rate", "3e-2", "--seed", "4", "--device", "cpu", "--dropout", "0"),
    *("--log_interval", "2", "--eval_steps", "4", "--save_steps", "4", "--save_step_dense", "0"),
]


class BagNtp(LossFamily):
    """Each e2 token from the mean embedding of e1 and r plus a learned slot vector: NTP only."""

    family = "bag_ntp"
    headline_metric = "mrr"
    comparable_metric = "mrr"
    loss_terms = ("ntp",)

    def __init__(self, model_cfg, objective, vocab, entity_len: int) -> None:
        super().__init__()
        self.entity_len = entity_len
        self.embed = nn.Embedding(vocab.size, model_cfg.n_embd)
        self.slot = nn.Parameter(torch.zeros(entity_len, model_cfg.n_embd))
        self.head = nn.Linear(model_cfg.n_embd, vocab.size)

    def prepare(self, seq: torch.Tensor, kind: torch.Tensor, jepa_keep=None) -> tuple:
        return (seq,)

    def logits(self, seq: torch.Tensor) -> torch.Tensor:
        e = self.entity_len
        context = self.embed(seq[:, : e + 1]).mean(1)  # e1 tokens and r
        return self.head(context[:, None] + self.slot)  # (B, E, V)

    def losses(self, seq: torch.Tensor, with_logits=False, per_layer=False) -> LossOutput:
        logits = self.logits(seq)
        targets = seq[:, self.entity_len + 2 :]
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        count = torch.full((), float(targets.numel()))
        return LossOutput(sums={"ntp": total}, counts={"ntp": count}, logits=logits)

    def step_cost(self, kind: torch.Tensor) -> StepCost:
        b, e, (v, d) = int(kind.shape[0]), self.entity_len, self.head.weight.shape
        return StepCost(tokens=b * (2 * e + 2), flops=6.0 * b * e * d * v)

    @torch.no_grad()
    def evaluate_split(
        self, split: Split, batch_size: int, per_layer=False, entity_mrr=False, progress=None
    ):
        was_training = self.training
        self.eval()
        out = self.losses(split.seq)
        self.train(was_training)
        items = item_metrics(out.logits, split.seq[:, self.entity_len + 2 :])
        ntp = float(out.sums["ntp"] / out.counts["ntp"])
        return {"ntp_loss": ntp, **summarise({k: [v] for k, v in items.items()})}

    @staticmethod
    def format_table(results: dict[str, Any]) -> str:
        rows = [f"{name} {m['mrr']:.4f}" for name, m in results["splits"].items()]
        return "\n".join([f"step {results['step']}", *rows])

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)


@pytest.fixture
def bag_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, "bag_ntp", BagNtp)
    # the config's family names: the argparse choices hold this list object itself
    names = config_module.MODEL_FAMILIES
    names.append("bag_ntp")
    yield
    names.remove("bag_ntp")


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _train(data_dir: Path, run: Path, *extra: str) -> None:
    argv = ["train", "--data_dir", str(data_dir), "--output_dir", str(run), *ARGS, *extra]
    assert main(argv) == 0


def test_a_family_from_outside_trains_resumes_and_evaluates(bag_family, small_dir, tmp_path):
    data_dir = small_dir  # the session's comb-10 dataset (conftest), read only
    _train(data_dir, tmp_path / "full", "--max_steps", "8")
    _train(data_dir, tmp_path / "cut", "--max_steps", "6")
    _train(data_dir, tmp_path / "cut", "--max_steps", "8", "--resume_from", "latest")
    full, cut = _records(tmp_path / "full"), _records(tmp_path / "cut")

    def training(records: list[dict]) -> list[dict]:
        speed = ("steps_per_s", "tokens_per_s", "mfu")
        return [
            {k: v for k, v in r.items() if k not in speed and "eval_" not in k} for r in records
        ]

    # the resumed run logs what the uninterrupted one does (the cut run also evaluated at its
    # last step, 6) and ends on the same weights
    assert training(full) == training(cut)
    assert full[-1] == {
        **cut[-1],
        **{k: full[-1][k] for k in ("steps_per_s", "tokens_per_s", "mfu")},
    }
    ends = [torch.load(tmp_path / r / "checkpoints" / "checkpoint_step_8.pt", weights_only=True)
            for r in ("full", "cut")]  # fmt: skip
    assert all(torch.equal(v, ends[1]["model_state_dict"][k])
               for k, v in ends[0]["model_state_dict"].items())  # fmt: skip
    logs = [r for r in full if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4, 6, 8]
    assert all([k for k in training([r])[0] if k.endswith("_loss")] == ["ntp_loss"] for r in logs)
    assert all(r["loss"] == r["ntp_loss"] > 0 for r in logs)  # gamma_ntp 1 x the one term
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in logs)
    evals = [r for r in full if "eval_test_mrr" in r]
    assert [r["step"] for r in evals] == [4, 8]

    # the trainer's checkpoint, scored by hand with plain torch, equals `revjepa evaluate`
    ckpt = tmp_path / "full" / "checkpoints" / "checkpoint_step_8.pt"
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--checkpoint", str(ckpt), "--data_dir", str(data_dir)]
    assert main([*argv, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["family"] == "bag_ntp"
    weights = torch.load(ckpt, weights_only=True)["model_state_dict"]
    test = load_dataset(data_dir).valid["test"].seq
    e = (test.shape[1] - 2) // 2
    context = weights["embed.weight"][test[:, : e + 1]].mean(1)
    logits = (context[:, None] + weights["slot"]) @ weights["head.weight"].T + weights["head.bias"]
    target = test[:, e + 2 :]
    logp = torch.log_softmax(logits, -1).gather(2, target[..., None]).squeeze(-1)
    first = logits[:, 0]
    rank1 = 1 + (first > first.gather(1, target[:, :1])).sum(1)
    got = result["splits"]["test"]
    assert got["ntp_loss"] == pytest.approx(-logp.mean().item(), rel=1e-5)
    assert got["mrr_token1"] == pytest.approx((1.0 / rank1.double()).mean().item(), rel=1e-6)
    assert evals[-1]["eval_test_mrr"] == pytest.approx(got["mrr"], rel=1e-6)

    # status reads the family's headline from the run's files, without the model class
    status = collect_status([tmp_path / "full"])[0]
    args = json.loads((tmp_path / "full" / "training_args.json").read_text())
    assert args["resolved"]["headline_metric"] == "mrr"
    assert args["resolved"]["loss_terms"] == ["ntp"]
    assert status["state"] == "finished" and status["headline"] == "mrr"


def test_the_registry_and_the_config_name_the_same_families():
    assert list(FAMILIES) == config_module.MODEL_FAMILIES == ["gpt2_jepa", "concept_jepa", "mlm_u"]
    for name, cls in FAMILIES.items():
        assert cls.family == name and cls.headline_metric and cls.comparable_metric
