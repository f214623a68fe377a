"""GPT-2 + LLM-JEPA: model construction and the one place where a batch becomes losses.

The weights are a plain Hugging Face `GPT2LMHeadModel` (HF key names, loadable by HF tooling).
The forward pass is ours, over those same modules, because one batch is ONE packed pass:

  JEPA row  (kind train):   [ e1 r <mask> e2 <PRED>*k | e2 r_inv <mask> e1 ]
  pair row  (other kinds):  [ item a                  | item b             | <pad>*k ]

A block-causal mask keeps the blocks of a row apart and position ids restart at 0 in every block,
so each block is encoded exactly as if alone (tests check this against HF's own forward). Items
without JEPA are packed two per row, so they never pay for a reverse block, and the LM head is
applied only at the positions that predict e2 tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from ..blocks import gpt2_block
from ..config import ModelConfig, ObjectiveConfig
from ..data import KIND_ID, Split, Vocab, entity_table, to_device
from ..errors import UserError
from ..flops import (
    StepCost,
    batch_shape,
    blocks_forward_flops,
    extension_flops,
    train_step_flops,
)
from ..metrics import chance_mrr, entity_trie
from ..ops import TORCH_OPS, StepOps
from ..progress import SILENT, Bar
from .base import LossOutput
from .entity_table import EntityTableFamily, SplitMetrics

hf_logging.set_verbosity_error()

ENTITY_KEYS = ("entity_mrr", "entity_acc")  # evaluate_split(..., entity_mrr=True)
ROW_BUCKET = 8  # packed rows per batch are padded to a multiple of this (see row_count)


def build_gpt2(cfg: ModelConfig, vocab: Vocab) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 (no download) sized from the config and the dataset's vocab."""
    if cfg.vocab_size is not None and cfg.vocab_size != vocab.size:
        raise UserError(
            f"--vocab_size {cfg.vocab_size} does not match the dataset's vocab.json ({vocab.size})"
        )
    hf_config = GPT2Config(
        vocab_size=vocab.size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=vocab.pad_id,
    )
    model = GPT2LMHeadModel(hf_config)
    if not cfg.position_embeddings:
        # Zero and frozen: HF tooling that adds wpe then computes exactly what we train.
        with torch.no_grad():
            model.transformer.wpe.weight.zero_()
        model.transformer.wpe.weight.requires_grad_(False)
    return model


def gpt2_hidden_states(
    lm: GPT2LMHeadModel,
    ids: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
    use_positions: bool,
    collect_layers: bool = False,
    tied=None,
    ops: StepOps = TORCH_OPS,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run GPT-2's blocks with an explicit (R, T, T) boolean attention mask (True = attend).

    Returns the last block's output BEFORE the final LayerNorm and, if asked, every layer's
    output (embeddings first), also before ln_f. `tied`: look the tokens up through the
    caller's tied head (`ops.tied_head`, whose loss will use the same matrix).
    """
    tr = lm.transformer
    h = tr.wte(ids) if tied is None else tied.embed(ids)
    if use_positions:
        h = h + tr.wpe(pos)
    h = ops.dropout(h, tr.drop.p, tr.drop.training)
    layers = [h] if collect_layers else []
    attn_mask = mask[:, None]
    for block in tr.h:
        h = gpt2_block(block, h, attn_mask, ops)
        if collect_layers:
            layers.append(h)
    return h, layers


def jepa_distance(
    pred: torch.Tensor,
    target: torch.Tensor,
    metric: str,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-item distance (n,) between pred and target embeddings (n, d), in float32. `valid`
    (n,) bool marks the real items when the batch holds others (infonce uses only real items
    as negatives; the distances of the others are meaningless and must be masked out)."""
    pred, target = pred.float(), target.float()
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1)
    if metric == "l2":
        return torch.linalg.vector_norm(pred - target, dim=-1)
    if metric == "mse":
        return (pred - target).pow(2).mean(-1)
    if metric == "infonce":
        sim = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T / temperature
        if valid is not None:
            # a large finite value, not -inf: a row with no real item stays finite (exp -> 0)
            sim = sim.masked_fill(~valid[None, :], -1e9)
        return -torch.diagonal(torch.log_softmax(sim, dim=-1))
    raise ValueError(f"unknown distance metric {metric!r}")


class GPT2Jepa(EntityTableFamily):
    """Model family `gpt2_jepa`: batch (seq, kind) -> NTP and LLM-JEPA loss sums."""

    family = "gpt2_jepa"
    headline_metric = "mrr"  # evaluation metric that picks best_model.pt
    comparable_metric = "entity_mrr"  # rank among all entities: comparable across families

    @property
    def loss_terms(self) -> tuple[str, ...]:
        return ("ntp", "jepa") if self.jepa else ("ntp",)

    @classmethod
    def build(cls, model_cfg, objective, vocab, entity_len, train_seq=None) -> GPT2Jepa:
        model = cls(model_cfg, objective, vocab, entity_len)
        if train_seq is not None:
            model.set_entity_table(entity_table(train_seq, entity_len))
        return model

    def step_cost(self, kind: torch.Tensor) -> StepCost:
        """Tokens of the packed pass and analytic FLOPs of one training step (flops.py)."""
        e, cfg = self.entity_len, self.model_cfg
        rows, row_len, scored = batch_shape(kind, 2 * e + 2, e, self.jepa, self.k)
        vocab = self.lm.config.vocab_size
        flops = train_step_flops(cfg.n_layer, cfg.n_embd, rows, row_len, scored, vocab)
        return StepCost(rows * row_len, flops)

    def __init__(
        self, model_cfg: ModelConfig, objective: ObjectiveConfig, vocab: Vocab, entity_len: int
    ) -> None:
        super().__init__()
        self.lm = build_gpt2(model_cfg, vocab)
        self.model_cfg, self.objective = model_cfg, objective
        self.entity_len = entity_len
        self.jepa = objective.jepa_active
        k = objective.k_pred_tok if self.jepa else 0
        self.k = k
        seq_len = 2 * entity_len + 2
        if seq_len + k > model_cfg.n_positions:
            raise UserError(
                f"--n_positions {model_cfg.n_positions} is shorter than a forward block "
                f"({seq_len} tokens + {k} <PRED>)"
            )
        self.register_buffer("inverse", vocab.inverse.clone(), persistent=False)
        self.pred_id, self.pad_id, self.mask_id = vocab.pred_id, vocab.pad_id, vocab.mask_id
        # Row templates: 0 = JEPA row, 1 = pair row (see module docstring).
        big_l = seq_len
        seg_j = [0] * (big_l + k) + [1] * big_l
        pos_j = list(range(big_l + k)) + list(range(big_l))
        seg_p = [0] * big_l + [1] * big_l + [2] * k
        pos_p = list(range(big_l)) * 2 + list(range(k))
        seg = torch.tensor([seg_j, seg_p])
        causal = torch.ones(len(seg_j), len(seg_j), dtype=torch.bool).tril()
        self.register_buffer(
            "row_masks", (seg[:, :, None] == seg[:, None, :]) & causal, persistent=False
        )
        self.register_buffer("row_pos", torch.tensor([pos_j, pos_p]), persistent=False)
        # the entity table of `entity_mrr` (set_entity_table); empty: not computable
        self.register_buffer(
            "entities", torch.zeros((0, entity_len), dtype=torch.int64), persistent=False
        )

    def reverse(self, seq: torch.Tensor) -> torch.Tensor:
        """e1 r <mask> e2  ->  e2 r_inv <mask> e1, on the device, for a batch of sequences."""
        e = self.entity_len
        inv = self.inverse[seq[:, e]]
        return torch.cat([seq[:, e + 2 :], inv[:, None], seq[:, e + 1 : e + 2], seq[:, :e]], 1)

    def row_count(self, n_jepa: int, n_other: int, fixed_shapes: bool) -> int:
        """Packed rows of a batch: JEPA rows + pair rows, rounded up to a multiple of ROW_BUCKET
        (the rest all-<pad>: oneDNN on CPU JIT-compiles a kernel per new GEMM shape, ~5 ms
        each, and a handful of shapes get reused instead). `fixed_shapes` takes the largest
        count any batch of this size can need, so that every step has the same shapes (what
        torch.compile with CUDA graphs requires), at the cost of some all-<pad> rows."""
        if fixed_shapes:
            b = n_jepa + n_other
            n_jepa, n_other = (b, 0) if self.jepa else (0, b)
        return -(-(n_jepa + (n_other + 1) // 2) // ROW_BUCKET) * ROW_BUCKET

    def prepare(
        self,
        seq: torch.Tensor,
        kind: torch.Tensor,
        jepa_keep: torch.Tensor | None = None,
        fixed_shapes: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The packing plan of a batch, computed on the host from `kind` (which may stay on the
        CPU while `seq` is on a GPU, as the trainer does: the plan has data-dependent counts,
        and a host plan saves a device-to-host synchronisation per step). Returns the
        arguments of `losses`; the plan is one int64 tensor of fixed size for a given row
        count, sent with one non-blocking copy.

        Layout (R rows, B items; index B stands for an all-<pad> item):
          slot0 (R)  item in a row's first block (a JEPA item or pair item a)
          slot1 (R)  item in a pair row's second block
          jepa  (R)  1 for JEPA rows
          order (B)  items in packing order (JEPA items, then items a, then items b)
          start (B)  flat position (row * row length + block offset) of each item in `order`
        """
        b, big_l = seq.shape
        kind = kind.cpu()  # a no-op for the trainer; DDP and callers may pass it on the device
        is_jepa = (kind == KIND_ID["train"]) if self.jepa else torch.zeros(b, dtype=torch.bool)
        idx_j = torch.nonzero(is_jepa).flatten()
        idx_o = torch.nonzero(~is_jepa).flatten()
        n_j, n_o = idx_j.numel(), idx_o.numel()
        # pair rows hold items a (even positions of idx_o) and b (odd); with an odd count the
        # last pair row's second slot stays <pad>
        n_a, n_b = (n_o + 1) // 2, n_o // 2
        n_rows = self.row_count(n_j, n_o, fixed_shapes)
        plan = torch.full((3 * n_rows + 2 * b,), b, dtype=torch.long)
        slot0, slot1, jepa, order, start = plan.split([n_rows, n_rows, n_rows, b, b])
        slot0[:n_j] = idx_j
        slot0[n_j : n_j + n_a] = idx_o[0::2]
        slot1[n_j : n_j + n_b] = idx_o[1::2]
        jepa.zero_()[:n_j] = 1
        order[:n_j] = idx_j
        order[n_j:] = torch.cat([idx_o[0::2], idx_o[1::2]])
        width = 2 * big_l + self.k
        start[: n_j + n_a] = torch.arange(n_j + n_a) * width
        start[n_j + n_a :] = torch.arange(n_j, n_j + n_b) * width + big_l
        return seq, to_device(plan, seq.device), jepa_keep

    def losses(
        self,
        seq: torch.Tensor,
        plan: torch.Tensor,
        jepa_keep: torch.Tensor | None = None,
        with_logits: bool = False,
        per_layer: bool = False,
    ) -> LossOutput:
        """Losses of one packed batch (see `prepare`). `jepa_keep` (B,) bool is the loss-dropout
        draw (None = keep all). Every shape here follows from the shapes of the inputs, and no
        branch depends on the data, so torch.compile traces it once and CUDA graphs can
        replay it."""
        b, e = seq.shape[0], self.entity_len
        n_rows = (plan.numel() - 2 * b) // 3
        slot0, slot1, jepa_row, order, start = plan.split([n_rows, n_rows, n_rows, b, b])
        ids = self.packed_ids(seq, slot0, slot1, jepa_row)
        row_type = 1 - jepa_row
        head = self.lm.lm_head.weight
        ops = self.ops
        tied = ops.tied_head(head) if head is self.lm.transformer.wte.weight else None
        h, layers = gpt2_hidden_states(
            self.lm,
            ids,
            self.row_pos[row_type],
            self.row_masks[row_type],
            self.model_cfg.position_embeddings,
            collect_layers=per_layer,
            tied=tied,
            ops=ops,
        )
        # NTP: the E positions before each e2 token, for every item, in packing order.
        cols = start[:, None] + torch.arange(e + 1, 2 * e + 1, device=seq.device)
        targets = seq[order, e + 2 :]
        ln_f = self.lm.transformer.ln_f
        scored = ln_f(h.flatten(0, 1)[cols])  # (B, E, d)
        want_logits = with_logits or per_layer  # a flag of the call, not of the data
        logits = None
        if want_logits or tied is None:
            logits = scored @ head.T  # (B, E, V)
            ntp_sum = ops.cross_entropy_sum(logits.flatten(0, 1), targets.flatten())
        else:  # training: the (B * E, V) logits never leave the loss
            ntp_sum = tied.cross_entropy_sum(scored.flatten(0, 1), targets.flatten())
        out = LossOutput(
            sums={"ntp": ntp_sum},
            counts={"ntp": torch.full((), float(b * e), device=seq.device)},  # a fill, not a copy
        )
        if self.jepa:
            self.add_jepa_terms(out, h, jepa_row.bool(), slot0, jepa_keep, seq.shape[1])
        if want_logits:
            self.add_logits(out, logits, layers, cols, order)
        return out

    def packed_ids(
        self,
        seq: torch.Tensor,
        slot0: torch.Tensor,
        slot1: torch.Tensor,
        jepa_row: torch.Tensor,
    ) -> torch.Tensor:
        """The (R, row length) token ids of the packed rows of a plan (see `prepare`)."""
        n_rows, big_l, k = slot0.numel(), seq.shape[1], self.k
        padded = torch.cat([seq, seq.new_full((1, big_l), self.pad_id)])  # item b = <pad>
        first, second = padded[slot0], padded[slot1]
        if not self.jepa:  # a configuration constant, not a data-dependent branch
            return torch.cat([first, second], 1)
        jepa_tail = torch.cat([first.new_full((n_rows, k), self.pred_id), self.reverse(first)], 1)
        pair_tail = torch.cat([second, second.new_full((n_rows, k), self.pad_id)], 1)
        tail = torch.where(jepa_row.bool()[:, None], jepa_tail, pair_tail)
        return torch.cat([first, tail], 1)

    def add_jepa_terms(
        self,
        out: LossOutput,
        h: torch.Tensor,
        is_jepa: torch.Tensor,
        slot0: torch.Tensor,
        jepa_keep: torch.Tensor | None,
        big_l: int,
    ) -> None:
        """The JEPA sum and count of `out`, from every row's pred and target embeddings; only
        JEPA rows (kept by loss dropout) count."""
        k, ln_f = self.k, self.lm.transformer.ln_f
        pred = ln_f(h[:, big_l + k - 1])
        target = ln_f(h[:, 2 * big_l + k - 1])
        objective = self.objective
        dist = jepa_distance(
            pred, target, objective.distance_metric, objective.infonce_temperature, is_jepa
        )
        weight = is_jepa
        if jepa_keep is not None:
            weight = weight & torch.cat([jepa_keep.bool(), jepa_keep.new_zeros(1).bool()])[slot0]
        out.sums["jepa"] = torch.where(weight, dist, 0.0).sum()
        out.counts["jepa"] = weight.sum().float()
        out.pred_embeddings = pred.detach()
        out.pred_rows = is_jepa

    def add_logits(
        self,
        out: LossOutput,
        logits: torch.Tensor,
        layers: list[torch.Tensor],
        cols: torch.Tensor,
        order: torch.Tensor,
    ) -> None:
        """`out.logits` (and `out.layer_logits` when `layers` were collected) in batch order."""
        inverse_order = torch.empty_like(order)
        inverse_order[order] = torch.arange(order.numel(), device=order.device)
        out.logits = logits.float()[inverse_order]
        if layers:
            ln_f, head = self.lm.transformer.ln_f, self.lm.lm_head.weight
            out.layer_logits = [
                (ln_f(layer.flatten(0, 1)[cols]) @ head.T).float()[inverse_order]
                for layer in layers
            ]

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate_split(
        self,
        split: Split,
        batch_size: int,
        per_layer: bool = False,
        entity_mrr: bool = False,
        progress: Bar | None = None,
    ) -> dict:
        """All metrics of one split (metrics.py), float32, eval mode, batches as tensor slices.
        `entity_mrr`: also `entity_mrr` / `entity_acc` (see `entity_rank_counts`; it needs the
        entity table and costs one extra pass per surviving candidate prefix). `progress` is
        advanced by the items done."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        seq, kind = split.seq.to(device), split.kind.to(device)
        sums, counts = dict.fromkeys(self.loss_terms, 0.0), dict.fromkeys(self.loss_terms, 0.0)
        acc = SplitMetrics(self, seq, entity_mrr, per_layer, progress or SILENT)
        for start in range(0, seq.shape[0], batch_size):
            s, k = seq[start : start + batch_size], kind[start : start + batch_size]
            out = self(s, k, with_logits=True, per_layer=per_layer)
            for name in sums:
                sums[name] += float(out.sums[name])
                counts[name] += float(out.counts[name])
            acc.add(start, s, out.logits, out.layer_logits)
        self.train(was_training)
        # a split without JEPA items (or a run without JEPA) has a JEPA loss of 0: the
        # evaluation table keeps both columns for every run of the family
        means = {name: sums[name] / counts[name] if counts[name] else 0.0 for name in sums}
        return {
            "loss": self.objective.total(means),
            "ntp_loss": means["ntp"],
            "jepa_loss": means.get("jepa", 0.0),
            **acc.result(int(seq.shape[0])),
        }

    def entity_metric_flops(self, n_items: int) -> float | None:
        """An upper bound on `entity_mrr`'s FLOPs over `n_items`: per item the cached pass over
        `e1 r <mask>`, then one extension pass (flops.extension_flops) for every prefix of every
        depth below E (the prefix's d tokens after the cache); the first token's distribution comes free with the teacher-forced logits.
        No pruning is assumed: it never makes the work larger, and how much it saves depends on
        the weights (little on a random model, whose true tail scores about -E ln V)."""
        if self.entities.shape[0] == 0:
            return None
        trie = entity_trie(self.entities)
        cfg, e = self.model_cfg, self.entity_len
        vocab = self.lm.config.vocab_size
        per_item = blocks_forward_flops(cfg.n_layer, cfg.n_embd, 1, e + 2) + sum(
            int(trie.nodes[d].shape[0]) * extension_flops(cfg.n_layer, cfg.n_embd, e + 2, d, vocab)
            for d in range(1, trie.depth)
        )
        return float(n_items) * per_item

    def prefix_cache(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's attention keys and values (R, heads, T, d_head) of the rows `ids`
        (R, T), each a sequence from position 0 (eval mode: no dropout)."""
        _, cache = self.extend(ids, None)
        return cache

    def extend(
        self, ids: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """GPT-2 over the tokens `ids` (R, t) that continue the rows of `cache` (the keys and
        values of their first T tokens; None: T = 0), attention causal: the output (R, t, d)
        after the final LayerNorm, and the cache of all T + t tokens. The math of
        `gpt2_hidden_states` on the whole rows, in eval mode (it never applies dropout)."""
        tr, cfg = self.lm.transformer, self.model_cfg
        t, past = ids.shape[1], 0 if cache is None else cache[0][0].shape[2]
        h = tr.wte(ids)
        if cfg.position_embeddings:
            h = h + tr.wpe(torch.arange(past, past + t, device=ids.device))
        mask = None  # one new token attends to every position
        if t > 1:
            col = torch.arange(past + t, device=ids.device)
            mask = col[None, :] <= past + torch.arange(t, device=ids.device)[:, None]
        new_cache = []
        for i, block in enumerate(tr.h):
            attn = block.attn
            heads, d = attn.num_heads, h.shape[-1]
            shape = (h.shape[0], t, heads, d // heads)
            qkv = attn.c_attn(block.ln_1(h))
            q, k, v = (x.view(shape).transpose(1, 2) for x in qkv.split(d, dim=2))
            if cache is not None:
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
            new_cache.append((k, v))
            y = F.scaled_dot_product_attention(q, k, v, mask).transpose(1, 2).reshape(h.shape)
            h = self.ops.residual_linear_dropout(
                h, y, attn.c_proj.weight, attn.c_proj.bias, 0.0, False
            )
            mlp = block.mlp
            a = self.ops.linear_gelu(block.ln_2(h), mlp.c_fc.weight, mlp.c_fc.bias)
            h = self.ops.residual_linear_dropout(
                h, a, mlp.c_proj.weight, mlp.c_proj.bias, 0.0, False
            )
        return tr.ln_f(h), new_cache

    def extension_logprobs(
        self,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        rows: torch.Tensor,
        tokens: torch.Tensor,
    ) -> torch.Tensor:
        """(n, V) float32 log-probabilities of the token after [row `rows[i]` of the cache,
        then `tokens[i]` (n, t >= 1)]."""
        picked = [(k[rows], v[rows]) for k, v in cache]
        h, _ = self.extend(tokens, picked)
        return torch.log_softmax((h[:, -1] @ self.lm.lm_head.weight.T).float(), -1)

    @staticmethod
    def format_table(results: dict[str, Any]) -> str:
        """The evaluation table of a gpt2_jepa result (entity columns "-" where not computed)."""
        return token_table(results, "ntp_loss", "NTP loss")


def token_table(
    results: dict[str, Any], loss_key: str, loss_label: str, entity_note: str = ""
) -> str:
    """The evaluation table of a result with the token-level metrics (gpt2_jepa, mlm_u): the
    family's loss column `loss_key` headed `loss_label`, entity columns "-" where not
    computed, `entity_note` after the entity line."""
    header = (
        f"{'split':<8} {loss_label:>9} {'MRR avg':>8} {'MRR tok1':>9} {'MRR tok2':>9} "
        f"{'MRR joint':>10} {'joint NLL':>10} {'joint acc':>10} {'entity MRR':>11} "
        f"{'entity acc':>11}"
    )
    lines = [f"step {results['step']}  ({results['checkpoint']})", header, "-" * len(header)]
    n_entities = None
    for name, m in results["splits"].items():
        entity = [f"{m[k]:>11.4f}" if k in m else f"{'-':>11}" for k in ENTITY_KEYS]
        n_entities = m.get("num_entities", n_entities)
        lines.append(
            f"{name:<8} {m[loss_key]:>9.4f} {m['mrr']:>8.4f} {m['mrr_token1']:>9.4f} "
            f"{m['mrr_token2']:>9.4f} {m['mrr_joint']:>10.4f} {m['joint_nll']:>10.4f} "
            f"{m['joint_accuracy']:>10.4f} {' '.join(entity)}"
        )
        for layer in m.get("per_layer", []):
            lines.append(
                f"  L{layer['layer']:<5} {'':>9} {layer['mrr']:>8.4f} "
                f"{layer['mrr_token1']:>9.4f} {layer['mrr_token2']:>9.4f} "
                f"{layer['mrr_joint']:>10.4f} {layer['joint_nll']:>10.4f} "
                f"{layer['joint_accuracy']:>10.4f}"
            )
    s = results["splits"]
    if "train" in s and "test" in s:
        lines.append(f"train-test MRR gap: {s['train']['mrr'] - s['test']['mrr']:+.4f}")
    if "atomic" in s and "test" in s:
        lines.append(
            f"atomic (seen direction) MRR {s['atomic']['mrr']:.4f} vs test (reverse) "
            f"MRR {s['test']['mrr']:.4f}"
        )
    if n_entities:
        lines.append(
            f"entity MRR: rank among all {n_entities} entities (chance "
            f"{chance_mrr(n_entities):.4f})"
        )
    return "\n".join(lines)
