"""Model family `mlm_u`: a GPT-2-sized bidirectional encoder trained with MLM-U, masked
language modelling at a uniformly drawn masking rate (Kitouni et al. 2024, "The Factorization
Curse", arXiv 2406.05183): a factorization-agnostic objective that learns to predict any
subset of an item's tokens from the rest, so that `e2 -> e1` is trained as much as `e1 -> e2`.

The weights are a plain Hugging Face `GPT2LMHeadModel` (same sizes and flags as gpt2_jepa),
run by our forward over its blocks with an all-True attention mask within an item, one item per
row, learned positions (required: without them a bidirectional encoder sees a bag of tokens).
Its config says `is_causal: false`, which Hugging Face transformers >= 5 honours: the exported
model (`revjepa export`) runs bidirectionally under `GPT2LMHeadModel.from_pretrained`.

  training   per item: a masking rate r ~ U(0, 1], then each maskable position is masked
             independently with probability r; when none is, the position of the smallest
             draw is (at least one masked token per item). Maskable: every token of
             `e1 r <mask> e2` but the template's constant `<mask>` slot (nothing to learn
             there). A masked token is replaced by [M] = the vocabulary's `<PRED>` (unused
             by this family otherwise; distinct from the template's `<mask>`). Loss `mlm`:
             cross-entropy at the masked positions, summed, over the masked-token count (the
             mean over the batch's masked tokens). The draws come from torch's default CPU
             generator (seeded by the trainer with --seed, saved in every checkpoint), on the
             host in `prepare`, in training mode only; under DDP every rank draws the global
             batch's masks and takes its slice, so N processes mask as one process does.
  evaluation the query of an item is `e1 r <mask> [M]..[M]` (its tail masked). A tail
             c = (c1, .., cE) scores by the chain rule in the fixed left-to-right order:
             log p(c1 | e1 r <mask> [M]..[M]) + log p(c2 | e1 r <mask> c1 [M]..) + ..., one
             pass per tail position with the earlier tail positions filled in. The token-level
             metrics (`mrr`, `mrr_token1`, `mrr_token2`, `mrr_joint`, `joint_nll`,
             `joint_accuracy`, `tail_loss` = mean NLL per tail token) read these passes
             teacher-forced on the true tail, as gpt2_jepa's read its NTP logits;
             `entity_mrr` / `entity_acc` rank the true tail among the run's entity table
             (stored in checkpoints) with gpt2_jepa's exact pruned search over the table's
             prefix tree, one pass per surviving (item, prefix).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import ModelConfig, ObjectiveConfig, RunConfig
from ..data import Split, Vocab, entity_table, to_device
from ..errors import UserError
from ..flops import StepCost, blocks_forward_flops, train_step_flops
from ..metrics import entity_trie
from ..progress import SILENT, Bar
from .base import LossOutput
from .entity_table import EntityTableFamily, SplitMetrics
from .gpt2_jepa import build_gpt2, gpt2_hidden_states, token_table


def expected_masked(maskable: int) -> float:
    """Expected masked positions per item: P/2 from r ~ U(0, 1], plus the forced one when
    none is drawn, P(none) = integral of (1 - r)^P dr = 1/(P + 1)."""
    return maskable / 2 + 1 / (maskable + 1)


def draw_masks(n: int, maskable: int) -> torch.Tensor:
    """(n, maskable) bool MLM-U masks from torch's default CPU generator: per row a rate
    r = 1 - U[0, 1) in (0, 1], each position masked when its U[0, 1) draw is below r, and
    the position of the row's smallest draw masked in any case (a row's draws are distinct
    almost surely, so that is one uniformly chosen position, masked whenever no other is)."""
    rate = 1.0 - torch.rand(n)
    u = torch.rand(n, maskable)
    masked = u < rate[:, None]
    masked[torch.arange(n), u.argmin(1)] = True
    return masked


class MlmU(EntityTableFamily):
    """Model family `mlm_u`: batch (seq, kind) -> the MLM-U loss sum (see the module doc)."""

    family = "mlm_u"
    headline_metric = "mrr"  # picks best_model.pt, as gpt2_jepa's (always computed)
    comparable_metric = "entity_mrr"  # rank among all entities: comparable across families
    loss_terms = ("mlm",)

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        if not config.model.position_embeddings:
            raise UserError(
                "--model_family mlm_u needs position embeddings (--no_position_embeddings "
                "leaves a bidirectional encoder a bag of tokens: it cannot tell e1 from e2)"
            )

    @classmethod
    def build(cls, model_cfg, objective, vocab, entity_len, train_seq=None) -> MlmU:
        model = cls(model_cfg, objective, vocab, entity_len)
        if train_seq is not None:
            model.set_entity_table(entity_table(train_seq, entity_len))
        return model

    def __init__(
        self, model_cfg: ModelConfig, objective: ObjectiveConfig, vocab: Vocab, entity_len: int
    ) -> None:
        super().__init__()
        if not model_cfg.position_embeddings:
            raise UserError(
                "--model_family mlm_u needs position embeddings (see --no_position_embeddings)"
            )
        seq_len = 2 * entity_len + 2
        if seq_len > model_cfg.n_positions:
            raise UserError(
                f"--n_positions {model_cfg.n_positions} is shorter than an item ({seq_len} tokens)"
            )
        self.lm = build_gpt2(model_cfg, vocab)
        self.lm.config.is_causal = False  # Hugging Face's own forward then attends both ways
        self.model_cfg, self.objective = model_cfg, objective
        self.entity_len, self.seq_len = entity_len, seq_len
        self.m_id = vocab.pred_id  # [M]: see the module doc
        slot = entity_len + 1  # the template's constant <mask>
        self.maskable = [i for i in range(seq_len) if i != slot]
        self.register_buffer(
            "attend", torch.ones(1, seq_len, seq_len, dtype=torch.bool), persistent=False
        )
        self.register_buffer("positions", torch.arange(seq_len), persistent=False)
        self.register_buffer(
            "entities", torch.zeros((0, entity_len), dtype=torch.int64), persistent=False
        )

    def step_cost(self, kind: torch.Tensor) -> StepCost:
        """One row of 2E + 2 tokens per item; the LM head at the expected number of masked
        positions (the draw is random: over a log window the mean is what counts)."""
        cfg, b = self.model_cfg, int(kind.numel())
        scored = b * expected_masked(len(self.maskable))
        vocab = self.lm.config.vocab_size
        flops = train_step_flops(cfg.n_layer, cfg.n_embd, b, self.seq_len, scored, vocab)
        return StepCost(b * self.seq_len, flops)

    # ------------------------------------------------------------------ training

    def encode(
        self, ids: torch.Tensor, collect_layers: bool = False, tied=None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """GPT-2's blocks over rows `ids` (R, 2E + 2), bidirectional (before ln_f)."""
        return gpt2_hidden_states(
            self.lm, ids, self.positions, self.attend, True, collect_layers, tied, self.ops
        )

    def training_masks(self, b: int) -> torch.Tensor:
        """(b, 2E + 2) bool: this process's slice of the global batch's MLM-U masks."""
        world, rank = 1, 0
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        masked = draw_masks(b * world, len(self.maskable))[rank * b : (rank + 1) * b]
        full = torch.zeros(b, self.seq_len, dtype=torch.bool)
        full[:, self.maskable] = masked
        return full

    def tail_masks(self, b: int) -> torch.Tensor:
        """(b, 2E + 2) bool: the tail positions (the query of the evaluation)."""
        full = torch.zeros(b, self.seq_len, dtype=torch.bool)
        full[:, self.entity_len + 2 :] = True
        return full

    def prepare(
        self,
        seq: torch.Tensor,
        kind: torch.Tensor,
        jepa_keep: torch.Tensor | None = None,
        fixed_shapes: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The host half: in training mode a fresh MLM-U draw (`training_masks`), in eval mode
        the tail masked (deterministic, no draw); then `plan_masks`. `kind` and `jepa_keep`
        (loss dropout, a JEPA option) do not apply."""
        b = seq.shape[0]
        masked = self.training_masks(b) if self.training else self.tail_masks(b)
        return self.plan_masks(seq, masked, fixed_shapes)

    def plan_masks(
        self, seq: torch.Tensor, masked: torch.Tensor, fixed_shapes: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The arguments of `losses` for a given (B, 2E + 2) host mask: one int64 plan (the
        mask, then the flat positions the LM head scores) sent with one non-blocking copy.
        Scored: the masked positions; with `fixed_shapes` (torch.compile) every maskable
        position, the unmasked ones weighted 0, so that every step has the same shapes."""
        b, big_l = seq.shape
        flat = masked.flatten()
        if fixed_shapes:
            maskable = torch.tensor(self.maskable)
            scored = (torch.arange(b)[:, None] * big_l + maskable[None]).flatten()
        else:
            scored = torch.nonzero(flat).flatten()
        plan = torch.cat([flat.long(), scored])
        return seq, to_device(plan, seq.device), fixed_shapes

    def losses(
        self,
        seq: torch.Tensor,
        plan: torch.Tensor,
        fixed_shapes: bool = False,
        with_logits: bool = False,
        per_layer: bool = False,
    ) -> LossOutput:
        """The `mlm` sum and count of a planned batch (see `plan_masks`); `with_logits`: the
        (B, E, V) logits at the tail positions of this pass (`layer_logits` with `per_layer`)."""
        b, big_l = seq.shape
        masked = plan[: b * big_l].view(b, big_l).bool()
        scored = plan[b * big_l :]
        ids = torch.where(masked, self.m_id, seq)
        head, ops = self.lm.lm_head.weight, self.ops
        tied = ops.tied_head(head) if head is self.lm.transformer.wte.weight else None
        h, layers = self.encode(ids, collect_layers=per_layer, tied=tied)
        ln_f = self.lm.transformer.ln_f
        x = ln_f(h.flatten(0, 1)[scored])
        target = seq.flatten()[scored]
        if fixed_shapes:  # a flag of the plan, not of the data: one graph per value
            weight = masked.flatten()[scored]
            ce = F.cross_entropy((x @ head.T).float(), target, reduction="none")
            total, count = torch.where(weight, ce, 0.0).sum(), weight.sum().float()
        else:
            if tied is None or with_logits or per_layer:
                total = ops.cross_entropy_sum(x @ head.T, target)
            else:  # training: the (n, V) logits never leave the loss
                total = tied.cross_entropy_sum(x, target)
            count = torch.full((), float(scored.numel()), device=seq.device)
        out = LossOutput(sums={"mlm": total}, counts={"mlm": count})
        if with_logits or per_layer:
            tail = slice(self.entity_len + 2, None)
            out.logits = (ln_f(h[:, tail]) @ head.T).float()
            if per_layer:
                out.layer_logits = [(ln_f(layer[:, tail]) @ head.T).float() for layer in layers]
        return out

    # ------------------------------------------------------------------ evaluation

    def query_ids(self, seq: torch.Tensor, depth: int) -> torch.Tensor:
        """The items with their tail from position `depth` on masked: [e1 r <mask> t_<depth
        [M]..[M]] (depth 0: the query)."""
        ids = seq.clone()
        ids[:, self.entity_len + 2 + depth :] = self.m_id
        return ids

    def chain_logits(
        self, seq: torch.Tensor, per_layer: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, E, V) float32 logits of tail position j from the pass with the tail's first j
        tokens filled in and the rest [M] (the chain rule's factors, teacher-forced on the
        true tail), and with `per_layer` the same at every layer's output (logit lens)."""
        e, ln_f, head = self.entity_len, self.lm.transformer.ln_f, self.lm.lm_head.weight
        logits, layer_logits = [], []
        for j in range(e):
            h, layers = self.encode(self.query_ids(seq, j), collect_layers=per_layer)
            logits.append((ln_f(h[:, e + 2 + j]) @ head.T).float())
            layer_logits.append([(ln_f(x[:, e + 2 + j]) @ head.T).float() for x in layers])
        per = [torch.stack(ls, 1) for ls in zip(*layer_logits)] if per_layer else []
        return torch.stack(logits, 1), per

    @torch.no_grad()
    def evaluate_split(
        self,
        split: Split,
        batch_size: int,
        per_layer: bool = False,
        entity_mrr: bool = False,
        progress: Bar | None = None,
    ) -> dict:
        """All metrics of one split (see the module doc), float32, eval mode, no RNG draw.
        `entity_mrr`: also `entity_mrr` / `entity_acc` / `num_entities` (needs the table).
        `progress` is advanced by the items done."""
        was_training = self.training
        self.eval()
        seq = split.seq.to(next(self.parameters()).device)
        e = self.entity_len
        acc = SplitMetrics(self, seq, entity_mrr, per_layer, progress or SILENT)
        nll = 0.0
        for start in range(0, seq.shape[0], batch_size):
            s = seq[start : start + batch_size]
            logits, per = self.chain_logits(s, per_layer)
            tail = s[:, e + 2 :]
            nll += float(F.cross_entropy(logits.flatten(0, 1), tail.flatten(), reduction="sum"))
            acc.add(start, s, logits, per)  # gpt2_jepa's chunked search, this family's passes
        self.train(was_training)
        n = int(seq.shape[0])
        return {"tail_loss": nll / (n * e) if n else 0.0, **acc.result(n)}

    def entity_metric_flops(self, n_items: int) -> float | None:
        """An upper bound on `entity_mrr`'s FLOPs over `n_items` (no pruning): one full
        bidirectional pass of 2E + 2 tokens and the LM head at one position for every prefix
        of every depth below E (the true tail's own passes are the token metrics' already)."""
        if self.entities.shape[0] == 0:
            return None
        trie = entity_trie(self.entities)
        cfg, e = self.model_cfg, self.entity_len
        per_pass = blocks_forward_flops(cfg.n_layer, cfg.n_embd, 1, 2 * e + 2)
        per_pass += 2 * cfg.n_embd * self.lm.config.vocab_size
        prefixes = sum(int(trie.nodes[d].shape[0]) for d in range(1, trie.depth))
        return float(n_items) * prefixes * per_pass

    def prefix_cache(self, ids: torch.Tensor) -> torch.Tensor:
        """The context `e1 r <mask>` (B, E + 2) of each item."""
        return ids

    def extension_logprobs(
        self, cache: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """(n, V) float32 log p(next tail token | [context of item `rows[i]`, the tail prefix
        `tokens[i]` (n, d >= 1), [M] at the tail's remaining positions])."""
        d = tokens.shape[1]
        masks = tokens.new_full((tokens.shape[0], self.entity_len - d), self.m_id)
        h, _ = self.encode(torch.cat([cache[rows], tokens, masks], 1))
        x = self.lm.transformer.ln_f(h[:, self.entity_len + 2 + d])
        return torch.log_softmax((x @ self.lm.lm_head.weight.T).float(), -1)

    @staticmethod
    def format_table(results: dict[str, Any]) -> str:
        """The evaluation table of an mlm_u result (entity columns "-" where not computed)."""
        return token_table(
            results, "tail_loss", "tail loss",
            "; a tail scores log p(c1 | query) + log p(c2 | query, c1), "
            "query = e1 r <mask> [M]..[M]",
        )  # fmt: skip
