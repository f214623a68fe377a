"""Model family `concept_jepa`: concept-level prediction with an in-batch contrastive loss.

Wang & Sun (2025, arXiv 2504.01928, §3.3 and Appendix B). No positional parameters anywhere.

  item  e1 r <mask> e2  ->  P = 4 patches  [e1] [r] [<mask>] [e2], each right-padded with <pad>
        to the longest patch (the entity length E)

  recognition  every patch is encoded on its own (patches folded into the batch axis):
               R causal GPT-2 blocks over the patch's token embeddings; the concept vector is
               the hidden state at the patch's last real token (no final LayerNorm).
               --memory_layer replaces the whole recognition block (R = 1): u = mean of the
               patch's token embeddings (the causal mean-pool read at the last real token),
               scores = W_k u / sqrt(d), softmax over the top-k scores only, output = W_v^T a.
  semantic     S causal GPT-2 blocks over the concept vectors [e1] [r] [<mask>]; the prediction
               is the output at the <mask> patch, passed through the concept normalisation
               (`rms`: x / sqrt(mean(x^2) + 1e-6), predictions only, no parameters;
               `layernorm`: one affine LayerNorm on predictions and candidates alike).
  loss         cross-entropy over logits = prediction . candidates^T / temperature, candidates
               = the concept vectors of every patch of every item of the batch (or, with
               --concept_candidates entities, of the entity patches only, duplicates of the
               label's entity masked out); the label is the item's own tail patch; gradients
               flow into both sides. Every training item (kinds train and atomic) is used.

The trainer sees the usual LossOutput: the concept loss is the `jepa` sum/count, NTP is zero.
Evaluation: in-batch `concept_loss`/`concept_mrr` and the headline `concept_mrr_full`, the
rank of the true tail among the recognition outputs of ALL entities of the training data (the
`entities` buffer, saved in every checkpoint, so a checkpoint alone rebuilds the model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from ..blocks import gpt2_block
from ..config import ModelConfig, ObjectiveConfig
from ..data import Split, Vocab, entity_table
from ..errors import UserError
from ..flops import StepCost, blocks_forward_flops
from ..ops import TORCH_OPS, StepOps
from ..progress import SILENT, Bar
from .base import LossFamily, LossOutput

HEAD, RELATION, MASK, TAIL = range(4)
NUM_PATCHES = 4
RMS_EPS = 1e-6
LN_EPS = 1e-5


# ----------------------------------------------------------------------------- pure pieces


def rms_norm(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis (no parameters)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def concept_logits(
    pred: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float = 1.0,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """(n, m) float32 logits of normalised predictions (n, d) against candidates (m, d).

    `exclude` (n, m) bool removes candidates from an item's softmax (set to -inf).
    """
    logits = pred.float() @ candidates.float().T
    if temperature != 1.0:
        logits = logits / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    return logits


def ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """rank = 1 + number of candidates with a strictly larger score. scores (n, m), target (n,)."""
    return 1 + (scores > target[:, None]).sum(1)


def rr_sum(rank: torch.Tensor) -> torch.Tensor:
    """Sum of reciprocal ranks, float64, on the ranks' device."""
    return (1.0 / rank.double()).sum()


def run_blocks(
    blocks: nn.ModuleList,
    h: torch.Tensor,
    collect_layers: bool = False,
    ops: StepOps = TORCH_OPS,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """GPT-2 blocks with causal attention over axis 1 (the math of `gpt2_jepa.gpt2_hidden_states`)."""
    layers = [h] if collect_layers else []
    for block in blocks:
        h = gpt2_block(block, h, ops=ops)
        if collect_layers:
            layers.append(h)
    return h, layers


class MemoryLayer(nn.Module):
    """scores = W_k u / sqrt(d); a = softmax over the top-k scores (0 elsewhere); out = W_v^T a."""

    def __init__(self, rows: int, dim: int, top_k: int) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.empty(rows, dim))
        self.values = nn.Parameter(torch.empty(rows, dim))
        nn.init.normal_(self.keys, std=0.02)
        nn.init.normal_(self.values, std=0.02)
        self.top_k = top_k

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        scores = u @ self.keys.T / math.sqrt(u.shape[-1])
        top, idx = scores.topk(min(self.top_k, self.keys.shape[0]), dim=-1)
        weights = torch.softmax(top, dim=-1)
        return (weights.unsqueeze(-1) * self.values[idx]).sum(-2)


# ----------------------------------------------------------------------------- the family


class ConceptJepa(LossFamily):
    """Model family `concept_jepa`: batch (seq, kind) -> concept contrastive loss sums."""

    family = "concept_jepa"
    headline_metric = "concept_mrr_full"  # evaluation metric that picks best_model.pt
    comparable_metric = "concept_mrr_full"  # already the rank among all entities
    loss_terms = ("jepa",)  # the concept-level contrastive loss only: this family has no NTP

    @classmethod
    def build(cls, model_cfg, objective, vocab, entity_len, train_seq=None) -> ConceptJepa:
        return cls(model_cfg, objective, vocab, entity_len, train_seq)

    def __init__(
        self,
        model_cfg: ModelConfig,
        objective: ObjectiveConfig,
        vocab: Vocab,
        entity_len: int,
        train_seq: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if model_cfg.vocab_size is not None and model_cfg.vocab_size != vocab.size:
            raise UserError(
                f"--vocab_size {model_cfg.vocab_size} does not match the dataset's vocab.json "
                f"({vocab.size})"
            )
        if entity_len < 1:
            raise UserError(f"concept_jepa needs entities of at least one token, got {entity_len}")
        self.model_cfg, self.objective = model_cfg, objective
        self.entity_len = entity_len
        self.vocab_size = vocab.size
        self.pad_id, self.mask_id = vocab.pad_id, vocab.mask_id
        d = model_cfg.n_embd
        # single-token patch types (relations and <mask>), in id order: memory rows after entities
        single = torch.cat([vocab.relation_ids, torch.tensor([vocab.mask_id])]).sort().values
        self.register_buffer("single_tokens", single, persistent=False)
        entities = (
            entity_table(train_seq, entity_len)
            if train_seq is not None
            else torch.zeros((0, entity_len), dtype=torch.int64)  # filled by load_hf_state_dict
        )
        self.register_buffer("entities", entities)  # persistent: part of every checkpoint

        self.wte = nn.Embedding(vocab.size, d)
        self.drop = nn.Dropout(model_cfg.dropout)
        n_rec = 0 if model_cfg.memory_layer else model_cfg.num_rec_layers
        block_cfg = GPT2Config(
            vocab_size=vocab.size,
            n_embd=d,
            n_head=model_cfg.n_head,
            n_layer=n_rec + model_cfg.num_sem_layers,
            resid_pdrop=model_cfg.dropout,
            embd_pdrop=model_cfg.dropout,
            attn_pdrop=model_cfg.dropout,
            layer_norm_epsilon=LN_EPS,
        )
        self.rec = nn.ModuleList(GPT2Block(block_cfg, layer_idx=i) for i in range(n_rec))
        self.sem = nn.ModuleList(
            GPT2Block(block_cfg, layer_idx=n_rec + i) for i in range(model_cfg.num_sem_layers)
        )
        self.memory: MemoryLayer | None = None
        if model_cfg.memory_layer:
            rows = entities.shape[0] + single.numel() + model_cfg.memory_spare_rows
            self.memory = MemoryLayer(rows, d, model_cfg.memory_top_k)
        self.concept_ln = (
            nn.LayerNorm(d, eps=LN_EPS) if model_cfg.concept_norm == "layernorm" else None
        )
        self._init_weights(n_rec + model_cfg.num_sem_layers)

    # ------------------------------------------------------------------ construction helpers

    def _init_weights(self, n_blocks: int) -> None:
        """GPT-2's scheme: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 x blocks))."""
        with torch.no_grad():
            nn.init.normal_(self.wte.weight, std=0.02)
            for block in [*self.rec, *self.sem]:
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * max(n_blocks, 1)))
            if self.memory is not None:
                n_ent, n_single = self.entities.shape[0], self.single_tokens.numel()
                self.memory.keys[:n_ent] = self.wte(self.entities).mean(1)
                self.memory.keys[n_ent : n_ent + n_single] = self.wte(self.single_tokens)
        if self.memory is not None and self.model_cfg.memory_value_only:
            self.wte.weight.requires_grad_(False)
            self.memory.keys.requires_grad_(False)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights and the entity table, resizing the placeholders (same Parameter objects)."""
        entities = state["entities"]
        if entities.dim() != 2 or entities.shape[1] != self.entity_len:
            raise RuntimeError(
                f"entity table of shape {tuple(entities.shape)} does not fit {self.entity_len}-"
                "token entities"
            )
        self.entities = torch.zeros_like(entities, device=self.entities.device)
        if self.memory is not None:
            rows = state["memory.keys"].shape[0]
            for p in (self.memory.keys, self.memory.values):
                if p.shape[0] != rows:
                    p.data = p.data.new_zeros(rows, p.shape[1])
        self.load_state_dict(state)

    def export_config(self) -> dict[str, Any]:
        m, o = self.model_cfg, self.objective
        return {
            "model_type": "revjepa_concept_jepa",
            "family": self.family,
            "vocab_size": self.vocab_size,
            "n_embd": m.n_embd,
            "n_head": m.n_head,
            "num_rec_layers": 0 if m.memory_layer else m.num_rec_layers,
            "num_sem_layers": m.num_sem_layers,
            "concept_norm": m.concept_norm,
            "memory_layer": m.memory_layer,
            "memory_top_k": m.memory_top_k,
            "memory_value_only": m.memory_value_only,
            "memory_spare_rows": m.memory_spare_rows,
            "memory_rows": 0 if self.memory is None else int(self.memory.keys.shape[0]),
            "dropout": m.dropout,
            "concept_temperature": o.concept_temperature,
            "concept_candidates": o.concept_candidates,
            "entity_len": self.entity_len,
            "num_entities": int(self.entities.shape[0]),
            "pad_token_id": self.pad_id,
            "mask_token_id": self.mask_id,
            "layer_norm_epsilon": LN_EPS,
            "rms_norm_epsilon": RMS_EPS,
            "position_embeddings": False,
            "weights": {
                "wte.weight": "token embeddings (vocab_size, n_embd)",
                "rec.{i}.*": "recognition GPT-2 blocks (HF GPT2Block key names)",
                "sem.{i}.*": "semantic GPT-2 blocks (HF GPT2Block key names)",
                "memory.keys / memory.values": "memory layer (memory_rows, n_embd), if any: "
                "rows = entities (in `entities` order), then relation tokens and <mask> in id "
                "order, then spare rows",
                "concept_ln.*": "LayerNorm of predictions and candidates (concept_norm layernorm)",
                "entities": "int64 (num_entities, entity_len): the token ids of every entity",
            },
        }

    def export_pretrained(self, out_dir) -> None:
        """model.safetensors (the state dict above) + config.json; see `load_pretrained`."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        (out_dir / "config.json").write_text(json.dumps(self.export_config(), indent=2) + "\n")

    # ------------------------------------------------------------------ the computation

    def step_cost(self, kind: torch.Tensor) -> StepCost:
        """Tokens (the patches' and the concepts') and analytic FLOPs of one training step
        (see flops.py):
        recognition of the 4B patches (GPT-2 blocks over W = entity_len tokens, or the memory
        layer's scores against every row), the semantic blocks over the 3 patches before the
        tail, and the in-batch logits against the candidates."""
        b, d, w = int(kind.numel()), self.model_cfg.n_embd, self.entity_len
        if self.memory is not None:
            rec = 2.0 * NUM_PATCHES * b * d * self.memory.keys.shape[0]
        else:
            rec = blocks_forward_flops(len(self.rec), d, NUM_PATCHES * b, w)
        sem = blocks_forward_flops(len(self.sem), d, b, TAIL)
        per_item = 2 if self.objective.concept_candidates == "entities" else NUM_PATCHES
        flops = 3.0 * (rec + sem + 2.0 * b * (per_item * b) * d)
        return StepCost(NUM_PATCHES * b * w + TAIL * b, flops)

    def patchify(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, 2E + 2) sequences -> (B, 4, E) patches [e1] [r <pad>..] [<mask> <pad>..] [e2]."""
        e, b = self.entity_len, seq.shape[0]
        single = seq[:, e : e + 2, None]
        if e > 1:
            single = torch.cat([single, single.new_full((b, 2, e - 1), self.pad_id)], 2)
        return torch.cat([seq[:, None, :e], single, seq[:, None, e + 2 :]], 1)

    def recognise(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, W) right-padded patches -> (N, d) concept vectors, each patch on its own."""
        real = patches != self.pad_id
        if self.memory is not None:
            emb = self.wte(patches)
            w = real.to(emb.dtype)[..., None]
            u = (emb * w).sum(1) / w.sum(1).clamp(min=1)
            return self.memory(u)
        x = self.ops.dropout(self.wte(patches), self.drop.p, self.training)
        h, _ = run_blocks(self.rec, x, ops=self.ops)
        last = (real.sum(1) - 1).clamp(min=0)
        return h[torch.arange(h.shape[0], device=h.device), last]

    def normalise_pred(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x) if self.concept_ln is None else self.concept_ln(x)

    def normalise_target(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.concept_ln is None else self.concept_ln(x)

    def encode(
        self, seq: torch.Tensor, collect_layers: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """patches (B, 4, W), concepts (B, 4, d), normalised predictions (B, d), layer states."""
        patches = self.patchify(seq)
        b = patches.shape[0]
        concepts = self.recognise(patches.flatten(0, 1)).view(b, NUM_PATCHES, -1)
        # causal attention: the <mask> output never sees the tail, so the tail is not fed at all
        h, layers = run_blocks(self.sem, concepts[:, :TAIL], collect_layers, self.ops)
        return patches, concepts, self.normalise_pred(h[:, MASK]), layers

    def in_batch_logits(
        self, pred: torch.Tensor, patches: torch.Tensor, concepts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) logits against the batch's candidates and (B,) label columns (own tail)."""
        b = pred.shape[0]
        arange = torch.arange(b, device=pred.device)
        if self.objective.concept_candidates == "entities":
            cand = self.normalise_target(concepts[:, [HEAD, TAIL]]).flatten(0, 1)
            labels = arange * 2 + 1
            names = patches[:, [HEAD, TAIL]].flatten(0, 1)
            exclude = (names[labels][:, None] == names[None]).all(-1)
            exclude[arange, labels] = False
        else:
            cand = self.normalise_target(concepts).flatten(0, 1)
            labels = arange * NUM_PATCHES + TAIL
            exclude = None
        logits = concept_logits(pred, cand, self.objective.concept_temperature, exclude)
        return logits, labels

    def prepare(
        self,
        seq: torch.Tensor,
        kind: torch.Tensor,  # every kind is trained: nothing to plan
        jepa_keep: torch.Tensor | None = None,
        fixed_shapes: bool = False,  # the shapes are always fixed
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The arguments of `losses` (the host half of the family interface)."""
        return seq, jepa_keep

    def losses(
        self,
        seq: torch.Tensor,
        jepa_keep: torch.Tensor | None = None,
        with_logits: bool = False,
        per_layer: bool = False,
    ) -> LossOutput:
        """Loss sums of one batch; `jepa_keep` (B,) bool is the loss-dropout draw.

        Every item is trained whatever its kind (train and atomic); `with_logits` and
        `per_layer` are accepted for the family interface (no token logits here).
        """
        patches, concepts, pred, _ = self.encode(seq)
        logits, labels = self.in_batch_logits(pred, patches, concepts)
        loss = F.cross_entropy(logits, labels, reduction="none")
        if jepa_keep is None:
            total, count = loss.sum(), loss.new_full((), float(loss.shape[0]))
        else:
            keep = jepa_keep.to(loss.dtype)
            total, count = (loss * keep).sum(), keep.sum()
        return LossOutput(
            sums={"jepa": total}, counts={"jepa": count}, pred_embeddings=pred.detach()
        )

    @staticmethod
    def format_table(results: dict[str, Any]) -> str:
        """The evaluation table of a concept_jepa result."""
        splits = results["splits"]
        first = next(iter(splits.values()), {"concept_batch_size": 0, "num_entities": 0})
        header = f"{'split':<8} {'concept loss':>13} {'concept MRR (in-batch)':>23} {'concept MRR full':>17}"
        lines = [f"step {results['step']}  ({results['checkpoint']})", header, "-" * len(header)]
        for name, m in splits.items():
            lines.append(
                f"{name:<8} {m['concept_loss']:>13.4f} {m['concept_mrr']:>23.4f} "
                f"{m['concept_mrr_full']:>17.4f}"
            )
            for layer in m.get("per_layer", []):
                lines.append(
                    f"  L{layer['layer']:<5} {'':>13} {'':>23} {layer['concept_mrr_full']:>17.4f}"
                )
        lines.append(
            f"in-batch candidates: batches of {first['concept_batch_size']} items; full: all "
            f"{first['num_entities']} entities"
        )
        if "atomic" in splits and "test" in splits:
            lines.append(
                f"atomic (seen direction) concept MRR full {splits['atomic']['concept_mrr_full']:.4f} "
                f"vs test (reverse) {splits['test']['concept_mrr_full']:.4f}"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def entity_concepts(self, chunk: int) -> torch.Tensor:
        """(N_ent, d) float32: the normalised recognition output of every entity (eval mode)."""
        out = [
            self.normalise_target(self.recognise(self.entities[i : i + chunk])).float()
            for i in range(0, self.entities.shape[0], chunk)
        ]
        if not out:
            raise UserError(
                "concept_jepa model has an empty entity table (built without training data)"
            )
        return torch.cat(out)

    def entity_index(self, names: torch.Tensor) -> torch.Tensor:
        """Row of each entity (n, E) in the entity table, -1 when absent."""
        n_ent = self.entities.shape[0]
        _, inverse = torch.unique(torch.cat([self.entities, names]), dim=0, return_inverse=True)
        row_of = torch.full((int(inverse.max()) + 1,), -1, device=names.device)
        row_of[inverse[:n_ent]] = torch.arange(n_ent, device=names.device)
        return row_of[inverse[n_ent:]]

    @torch.no_grad()
    def evaluate_split(
        self,
        split: Split,
        batch_size: int,
        per_layer: bool = False,
        entity_mrr: bool = False,  # noqa: ARG002 (its entity metric, concept_mrr_full, always is)
        progress: Bar | None = None,
    ) -> dict[str, Any]:
        """Concept metrics of one split, float32, eval mode; per-item means. `progress` is
        advanced by the items done."""
        was_training = self.training
        self.eval()
        try:
            return self._evaluate(split, batch_size, per_layer, progress or SILENT)
        finally:
            self.train(was_training)

    def _evaluate(self, split: Split, batch_size: int, per_layer: bool, bar: Bar) -> dict[str, Any]:
        device = self.wte.weight.device
        seq = split.seq.to(device)
        e = self.entity_len
        table = self.entity_concepts(max(batch_size, 1) * NUM_PATCHES)  # once per evaluation
        row = self.entity_index(seq[:, e + 2 :])
        # running sums stay on the device: one host transfer per evaluation, not per batch
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, rr, rr_full, acc_full
        layer_rr: torch.Tensor | None = None
        for start in range(0, seq.shape[0], batch_size):
            s = seq[start : start + batch_size]
            rows = row[start : start + batch_size]
            patches, concepts, pred, layers = self.encode(s, collect_layers=per_layer)
            logits, labels = self.in_batch_logits(pred, patches, concepts)
            rank = ranks(logits, logits.gather(1, labels[:, None]).squeeze(1))
            tail = concepts[:, TAIL]
            full = self._full_ranks(pred, tail, rows, table)
            sums += torch.stack(
                [
                    F.cross_entropy(logits, labels, reduction="sum").double(),
                    rr_sum(rank),
                    rr_sum(full),
                    (full == 1).sum().double(),
                ]
            )
            if per_layer:
                rr = torch.stack(
                    [
                        rr_sum(self._full_ranks(self.normalise_pred(h[:, MASK]), tail, rows, table))
                        for h in layers
                    ]
                )
                layer_rr = rr if layer_rr is None else layer_rr + rr
            bar.update(s.shape[0])
        loss_sum, rr_in_batch, rr_full_sum, acc_full_sum = sums.tolist()
        n = int(seq.shape[0])
        concept_loss = loss_sum / n
        mrr_full = rr_full_sum / n
        result: dict[str, Any] = {
            "loss": self.objective.lambda_jepa * concept_loss,
            "concept_loss": concept_loss,
            "concept_mrr": rr_in_batch / n,
            "concept_batch_size": int(batch_size),
            "concept_mrr_full": mrr_full,
            "concept_acc_full": acc_full_sum / n,
            "mrr": mrr_full,  # alias: run-level tools (plot, sweep summary) read `mrr`
            "num_entities": int(table.shape[0]),
            "num_samples": n,
        }
        if per_layer and layer_rr is not None:
            result["per_layer"] = [
                {"layer": i, "concept_mrr_full": v / n} for i, v in enumerate(layer_rr.tolist())
            ]
        return result

    def _full_ranks(
        self, pred: torch.Tensor, tail: torch.Tensor, row: torch.Tensor, table: torch.Tensor
    ) -> torch.Tensor:
        """Rank of the true tail among all entities' recognition outputs (the table)."""
        scores = pred.float() @ table.T
        found = row >= 0
        in_table = scores.gather(1, row.clamp(min=0)[:, None]).squeeze(1)
        # a tail outside the table (other data): its own recognition output is the target
        own = (pred.float() * self.normalise_target(tail).float()).sum(-1)
        return ranks(scores, torch.where(found, in_table, own))


def load_pretrained(out_dir) -> ConceptJepa:
    """Rebuild a ConceptJepa from an export directory (config.json, vocab.json, safetensors)."""
    from safetensors.torch import load_file

    from ..data import vocab_from_mapping

    out_dir = Path(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    meta = json.loads((out_dir / "revjepa.json").read_text())
    vocab = vocab_from_mapping(json.loads((out_dir / "vocab.json").read_text()), str(out_dir))
    model_cfg = ModelConfig(**meta["config"]["model"])
    objective = ObjectiveConfig(**meta["config"]["objective"])
    model = ConceptJepa(model_cfg, objective, vocab, int(cfg["entity_len"]))
    model.load_hf_state_dict(load_file(str(out_dir / "model.safetensors")))
    return model
