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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from .config import ModelConfig, ObjectiveConfig
from .data import KIND_ID, Vocab
from .errors import UserError
from .fastpath import cross_entropy_sum, dropout, residual_dropout

hf_logging.set_verbosity_error()

ROW_BUCKET = 8  # packed rows per batch are padded to a multiple of this (see GPT2Jepa.forward)


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


def gpt2_block(
    block: nn.Module, h: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One HF `GPT2Block` on h (R, T, d): causal attention when `attn_mask` is None, else the
    given boolean mask (R or 1, 1, T, T; True = attend). Same math as HF's block, fewer ops."""
    attn = block.attn
    q, k, v = attn.c_attn(block.ln_1(h)).split(attn.split_size, dim=2)
    shape = (h.shape[0], h.shape[1], attn.num_heads, attn.head_dim)
    q, k, v = (x.view(shape).transpose(1, 2) for x in (q, k, v))
    y = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=attn.attn_dropout.p if attn.training else 0.0,
        is_causal=attn_mask is None,
    )
    y = y.transpose(1, 2).reshape(h.shape)
    h = residual_dropout(h, attn.c_proj(y), attn.resid_dropout.p, attn.training)
    mlp = block.mlp
    # F.gelu(tanh) is GPT-2's "gelu_new" as one fused kernel (HF's version is 8 elementwise ops)
    a = F.gelu(mlp.c_fc(block.ln_2(h)), approximate="tanh")
    return residual_dropout(h, mlp.c_proj(a), mlp.dropout.p, mlp.training)


def gpt2_hidden_states(
    lm: GPT2LMHeadModel,
    ids: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
    use_positions: bool,
    collect_layers: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run GPT-2's blocks with an explicit (R, T, T) boolean attention mask (True = attend).

    Returns the last block's output BEFORE the final LayerNorm and, if asked, every layer's
    output (embeddings first), also before ln_f.
    """
    tr = lm.transformer
    h = tr.wte(ids)
    if use_positions:
        h = h + tr.wpe(pos)
    h = dropout(h, tr.drop.p, tr.drop.training)
    layers = [h] if collect_layers else []
    attn_mask = mask[:, None]
    for block in tr.h:
        h = gpt2_block(block, h, attn_mask)
        if collect_layers:
            layers.append(h)
    return h, layers


@dataclass
class LossOutput:
    """Sums and counts (not means) so that callers can normalise by global counts under DDP."""

    ntp_sum: torch.Tensor
    ntp_count: torch.Tensor
    jepa_sum: torch.Tensor
    jepa_count: torch.Tensor
    pred_embeddings: torch.Tensor | None = None  # (n_jepa, d), detached, for the collapse signal
    logits: torch.Tensor | None = None  # (B, E, V) float32 in batch order, when asked
    layer_logits: list[torch.Tensor] | None = None  # per layer (B, E, V), logit lens


def jepa_distance(
    pred: torch.Tensor, target: torch.Tensor, metric: str, temperature: float
) -> torch.Tensor:
    """Per-item distance (n,) between pred and target embeddings (n, d), in float32."""
    pred, target = pred.float(), target.float()
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1)
    if metric == "l2":
        return torch.linalg.vector_norm(pred - target, dim=-1)
    if metric == "mse":
        return (pred - target).pow(2).mean(-1)
    if metric == "infonce":
        sim = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T / temperature
        return -torch.diagonal(torch.log_softmax(sim, dim=-1))
    raise ValueError(f"unknown distance metric {metric!r}")


def collapse_signal(pred: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean pairwise cosine and mean per-dimension std of the batch's pred embeddings."""
    n = pred.shape[0]
    if n < 2:
        nan = pred.new_tensor(float("nan"))
        return {"pred_mean_cos": nan, "pred_std": nan}
    unit = F.normalize(pred.float(), dim=-1)
    total = unit.sum(0)
    mean_cos = (total @ total - n) / (n * (n - 1))
    return {"pred_mean_cos": mean_cos, "pred_std": pred.float().std(0).mean()}


class GPT2Jepa(nn.Module):
    """Model family `gpt2_jepa`: batch (seq, kind) -> NTP and LLM-JEPA loss sums."""

    family = "gpt2_jepa"
    headline_metric = "mrr"  # evaluation metric that picks best_model.pt

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

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return self.lm.state_dict()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.lm.load_state_dict(state)

    def export_pretrained(self, out_dir) -> None:
        self.lm.save_pretrained(out_dir, safe_serialization=True)

    def reverse(self, seq: torch.Tensor) -> torch.Tensor:
        """e1 r <mask> e2  ->  e2 r_inv <mask> e1, on the device, for a batch of sequences."""
        e = self.entity_len
        inv = self.inverse[seq[:, e]]
        return torch.cat([seq[:, e + 2 :], inv[:, None], seq[:, e + 1 : e + 2], seq[:, :e]], 1)

    def forward(
        self,
        seq: torch.Tensor,
        kind: torch.Tensor,
        jepa_keep: torch.Tensor | None = None,
        with_logits: bool = False,
        per_layer: bool = False,
    ) -> LossOutput:
        """Losses of one batch. `jepa_keep` (B,) bool is the loss-dropout draw (None = keep all).

        `kind` may stay on the CPU while `seq` is on a GPU (the trainer does that): the packing
        plan (which items go to which row) has data-dependent sizes, and computing it from a
        host tensor saves a device-to-host synchronisation per step.
        """
        b, big_l = seq.shape
        e, k = self.entity_len, self.k
        dev = seq.device
        is_jepa = (
            (kind == KIND_ID["train"]) if self.jepa else torch.zeros_like(kind, dtype=torch.bool)
        )
        idx_j = torch.nonzero(is_jepa).flatten()
        idx_o = torch.nonzero(~is_jepa).flatten()
        n_j, n_o = idx_j.numel(), idx_o.numel()
        # pair rows hold items a (even positions of idx_o) and b (odd); with an odd count the
        # last pair row's second slot stays <pad>
        n_a, n_b = (n_o + 1) // 2, n_o // 2
        # All-<pad> rows round the row count up to a multiple of ROW_BUCKET: the number of rows
        # varies with each batch's kinds, and oneDNN (bf16 on CPU) JIT-compiles a new kernel
        # for every new GEMM shape (~5 ms each). A handful of shapes get reused instead.
        n_rows = -(-(n_j + n_a) // ROW_BUCKET) * ROW_BUCKET
        # non_blocking: a host-to-device copy that does not wait for the queued GPU work
        idx_j, idx_a, idx_b = (
            x.to(dev, non_blocking=True) for x in (idx_j, idx_o[0::2], idx_o[1::2])
        )
        # Written into one <pad>-filled tensor by slices, without a branch on the counts: under
        # torch.compile every Python branch on a count is a guard, and each new combination of
        # guards (odd/even pair count, filler rows or none) was a recompilation.
        # (`if n_j` stays: it is constant in training, and no reverse is built without JEPA)
        ids = seq.new_full((n_rows, 2 * big_l + k), self.pad_id)
        if n_j:
            fwd = seq[idx_j]
            ids[:n_j, :big_l] = fwd
            ids[:n_j, big_l : big_l + k] = self.pred_id
            ids[:n_j, big_l + k :] = self.reverse(fwd)
        ids[n_j : n_j + n_a, :big_l] = seq[idx_a]
        ids[n_j : n_j + n_b, big_l : 2 * big_l] = seq[idx_b]
        row_type = (torch.arange(n_rows, device=dev) >= n_j).long()
        h, layers = gpt2_hidden_states(
            self.lm,
            ids,
            self.row_pos[row_type],
            self.row_masks[row_type],
            self.model_cfg.position_embeddings,
            collect_layers=per_layer,
        )

        # NTP: the E positions before each e2 token, for every item, in packing order.
        item_order = torch.cat([idx_j, idx_a, idx_b])
        item_row = torch.cat(
            [
                torch.arange(n_j + n_a, device=dev),
                torch.arange(n_j, n_j + n_b, device=dev),
            ]
        )
        item_off = torch.cat(
            [
                torch.zeros(n_j + n_a, dtype=torch.long, device=dev),
                torch.full((n_b,), big_l, device=dev),
            ]
        )
        cols = item_off[:, None] + torch.arange(e + 1, 2 * e + 1, device=dev)
        rows_ix = item_row[:, None].expand_as(cols)
        targets = seq[item_order, e + 2 :]
        head = self.lm.lm_head.weight
        ln_f = self.lm.transformer.ln_f
        logits = ln_f(h[rows_ix, cols]) @ head.T  # (B, E, V)
        ntp_sum = cross_entropy_sum(logits.flatten(0, 1), targets.flatten())
        out = LossOutput(
            ntp_sum=ntp_sum,
            ntp_count=torch.full((), float(b * e), device=dev),  # a fill, not a blocking copy
            jepa_sum=h.new_zeros((), dtype=torch.float32),
            jepa_count=torch.zeros((), device=dev),
        )
        if n_j:
            pred = ln_f(h[:n_j, big_l + k - 1])
            target = ln_f(h[:n_j, 2 * big_l + k - 1])
            dist = jepa_distance(
                pred, target, self.objective.distance_metric, self.objective.infonce_temperature
            )
            keep = torch.ones_like(dist) if jepa_keep is None else jepa_keep[idx_j].float()
            out.jepa_sum = (dist * keep).sum()
            out.jepa_count = keep.sum()
            out.pred_embeddings = pred.detach()
        if with_logits or per_layer:
            inverse_order = torch.empty_like(item_order)
            inverse_order[item_order] = torch.arange(b, device=dev)
            out.logits = logits.float()[inverse_order]
            if per_layer:
                out.layer_logits = [
                    (ln_f(layer[rows_ix, cols]) @ head.T).float()[inverse_order] for layer in layers
                ]
        return out


def build_model(
    model_cfg: ModelConfig,
    objective: ObjectiveConfig,
    vocab: Vocab,
    entity_len: int,
    train_seq: torch.Tensor | None = None,
) -> nn.Module:
    """The model of the configured family (the trainer and evaluator only use this interface).

    `train_seq` (the training sequences) gives concept_jepa its entity table; without it (a
    model rebuilt from a checkpoint) the table comes with the weights in load_hf_state_dict.
    """
    if model_cfg.family == "gpt2_jepa":
        return GPT2Jepa(model_cfg, objective, vocab, entity_len)
    if model_cfg.family == "concept_jepa":
        from .concept import ConceptJepa  # concept imports this module

        return ConceptJepa(model_cfg, objective, vocab, entity_len, train_seq)
    raise UserError(f"unknown model family {model_cfg.family!r}")
