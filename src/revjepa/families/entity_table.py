"""What the two token-level language-model families (`gpt2_jepa`, `mlm_u`) share: a Hugging
Face `GPT2LMHeadModel` as their weights (`self.lm`), and the run's entity table with the exact
search behind `entity_mrr` / `entity_acc`.

`entity_mrr` ranks the true tail among every entity of the table, scored by the chain rule
log p(c1) + log p(c2 | c1) + ...; the search below expands a prefix tree of the table and prunes
exactly. A family supplies its passes through two hooks: `prefix_cache(ids)` (whatever it keeps
of each item's `e1 r <mask>`) and `extension_logprobs(cache, rows, tokens)` (the log-probabilities
of the next tail token after a prefix), and `entity_metric_flops` (their cost, for
`--entity_mrr auto`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import entity_table
from ..errors import UserError
from ..metrics import EntityTrie, entity_trie, item_metrics, row_index, summarise
from ..progress import Bar
from .base import LossFamily

# (item, candidate prefix) pairs per chunk of `entity_mrr` (one progress update per chunk)
ENTITY_PAIRS_PER_CHUNK = 1 << 17


class EntityTableFamily(LossFamily):
    """A family whose weights are `self.lm` (a GPT2LMHeadModel) and that ranks among the run's
    entity table (`self.entities`, an (N, E) int64 buffer, empty when not known;
    `self.entity_len` = E). Subclasses define `prefix_cache` and `extension_logprobs`."""

    lm: Any
    entity_len: int

    def set_entity_table(self, entities: torch.Tensor) -> None:
        """The run's entity table (N, E) int64 that `entity_mrr` ranks among (kept out of the
        HF state dict, so `model_state_dict` and the export stay a plain GPT-2)."""
        if entities.dim() != 2 or entities.shape[1] != self.entity_len:
            raise UserError(
                f"entity table of shape {tuple(entities.shape)} does not fit "
                f"{self.entity_len}-token entities"
            )
        vocab = self.lm.config.vocab_size
        if entities.numel() and (int(entities.min()) < 0 or int(entities.max()) >= vocab):
            raise UserError(f"entity table has token ids outside the vocabulary (size {vocab})")
        self.entities = entities.to(self.entities.device, torch.int64)

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"entities": self.entities.cpu()} if self.entities.shape[0] else {}

    def load_checkpoint_extras(self, state: dict[str, Any], train_seq=None) -> None:
        """The stored table; checkpoints older than `entity_mrr` have none: then the one of
        the training data, if given."""
        table = state.get("entities")
        if table is None and train_seq is not None:
            table = entity_table(train_seq, self.entity_len)
        if table is not None:
            if not isinstance(table, torch.Tensor):
                raise UserError("the checkpoint's entity table is not a tensor")
            self.set_entity_table(table)

    @classmethod
    def needs_train_data(cls, state: dict[str, Any], entity_mrr: bool) -> bool:
        """A checkpoint older than `entity_mrr` stores no entity table: its metrics then rank
        among the entities of the data directory's train.json."""
        return entity_mrr and "entities" not in state

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return self.lm.state_dict()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.lm.load_state_dict(state)

    def export_pretrained(self, out_dir) -> None:
        self.lm.save_pretrained(out_dir, safe_serialization=True)

    def entity_batch_sums(
        self,
        seq: torch.Tensor,
        logits: torch.Tensor,
        entity: tuple[EntityTrie, list[torch.Tensor]],
        start: int,
        bar: Bar,
    ) -> torch.Tensor:
        """(sum of 1/rank, rank-1 count) of a batch starting at item `start` of the split, in
        chunks of items small enough that `bar` moves every few seconds even when each item
        costs thousands of candidate passes (the passes stay batched over a chunk's pairs)."""
        trie, nodes = entity
        prefixes = sum(int(trie.nodes[d].shape[0]) for d in range(1, trie.depth))
        step = max(1, ENTITY_PAIRS_PER_CHUNK // max(1, prefixes))
        sums = torch.zeros(2, dtype=torch.float64, device=seq.device)
        for i in range(0, seq.shape[0], step):
            j = min(i + step, seq.shape[0])
            chunk_nodes = [n[start + i : start + j] for n in nodes]
            rank = 1 + self.entity_rank_counts(seq[i:j], logits[i:j], trie, chunk_nodes)
            sums += torch.stack([(1.0 / rank.double()).sum(), (rank == 1).sum().double()])
            bar.update(j - i)
        return sums

    def entity_setup(self, seq: torch.Tensor) -> tuple[EntityTrie, list[torch.Tensor]]:
        """The entity table's prefix tree, and for every item of the split and every depth
        d < E the node of its true tail's first d tokens (-1 when no entity starts so)."""
        if self.entities.shape[0] == 0:
            raise UserError(
                f"entity_mrr: this {self.family} model has no entity table (a checkpoint without one "
                "is evaluated with the training data: a data directory with train.json)"
            )
        trie = entity_trie(self.entities.to(seq.device))
        tail = seq[:, self.entity_len + 2 :]
        root = torch.zeros(seq.shape[0], dtype=torch.long, device=seq.device)
        nodes = [root] + [row_index(trie.nodes[d], tail[:, :d]) for d in range(1, trie.depth)]
        return trie, nodes

    def entity_rank_counts(
        self,
        seq: torch.Tensor,
        logits: torch.Tensor,
        trie: EntityTrie,
        target_nodes: list[torch.Tensor],
        max_rows: int | None = None,
        prune: bool = True,
    ) -> torch.Tensor:
        """For each item of a batch: the number of entities of `trie` whose score is strictly
        larger than the true tail's (rank = 1 + this). Exact and vectorised.

        score(c) = sum_j log p(c_j | e1 r <mask> c_<j), float32 log-probabilities summed in
        float64 in token order. The true tail's distributions are the teacher-forced `logits`
        (B, E, V) of the batch; every other candidate prefix gets one extra pass of
        the prefix's tokens after the cached keys and values of e1 r <mask> (`extend`), batched
        over all (item, prefix) pairs, so each (item, prefix) distribution is computed once and
        shared by all its candidates.
        Pruning is exact: log-probabilities are <= 0 (also in float), so a prefix whose partial
        score is not above the tail's cannot have a candidate above it and is not expanded
        (`prune=False` expands every prefix: the same counts, for tests; `max_rows`: pairs per
        pass, by default from the vocabulary size and the device).
        """
        b, e = seq.shape[0], self.entity_len
        dev = seq.device
        tail = seq[:, e + 2 :]
        cache = self.prefix_cache(seq[:, : e + 2])  # e1 r <mask>, shared by all candidates
        lp_tail = torch.log_softmax(logits.float(), -1)  # (B, E, V)
        target = torch.zeros(b, dtype=torch.float64, device=dev)
        for j in range(e):  # the same float64 additions, in the same order, as the candidates'
            target = target + lp_tail[:, j].gather(1, tail[:, j : j + 1]).squeeze(1).double()
        vocab = lp_tail.shape[-1]
        greater = torch.zeros(b, dtype=torch.long, device=dev)
        item = torch.arange(b, device=dev)
        node = torch.zeros(b, dtype=torch.long, device=dev)
        partial = torch.zeros(b, dtype=torch.float64, device=dev)
        for d in range(trie.depth):
            widest = max(1, int(trie.count[d].max()))
            # pairs per pass: small CPU chunks stay in cache (2,048 was the fastest here),
            # large GPU ones fill the device; both bound the (rows, V) log-probabilities
            cap, budget = (16384, 1 << 27) if dev.type == "cuda" else (2048, 1 << 24)
            rows = max_rows or max(1, min(cap, budget // vocab, (1 << 21) // widest))
            kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            for s in range(0, item.numel(), rows):
                it, nd, pa = item[s : s + rows], node[s : s + rows], partial[s : s + rows]
                off = nd != target_nodes[d][it]  # not on the tail's own path
                count = trie.count[d][nd]
                owner = torch.repeat_interleave(torch.arange(nd.numel(), device=dev), count)
                first = (count.cumsum(0) - count)[owner]
                child = trie.start[d][nd][owner] + torch.arange(owner.numel(), device=dev) - first
                tok = trie.nodes[d + 1][child, d]
                lp = lp_tail[it[owner], d, tok]  # the tail's path: the batch's own logits
                if bool(off.any()):
                    ext = self.extension_logprobs(cache, it[off], trie.nodes[d][nd[off]])
                    off_child = off[owner]
                    slot = (off.cumsum(0) - 1)[owner[off_child]]
                    lp[off_child] = ext[slot, tok[off_child]]
                score = pa[owner] + lp.double()
                above = score > target[it[owner]]
                if d == trie.depth - 1:
                    greater.index_add_(0, it[owner], above.long())
                else:
                    keep = above if prune else torch.ones_like(above)
                    kept.append((it[owner][keep], child[keep], score[keep]))
            if d < trie.depth - 1:
                if not kept:  # no prefix above the tail's score: nothing deeper can be
                    break
                item, node, partial = (torch.cat(x) for x in zip(*kept))
        return greater


class SplitMetrics:
    """One split's metrics gathered batch by batch: the per-item token metrics (metrics.py),
    their per-layer copies, and the exact entity sums. Both families' `evaluate_split` feed it
    their own logits; `result` is the shared part of their result dict."""

    def __init__(
        self,
        family: EntityTableFamily,
        seq: torch.Tensor,
        entity_mrr: bool,
        per_layer: bool,
        bar: Bar,
    ) -> None:
        self.family, self.per_layer, self.bar = family, per_layer, bar
        self.entity = family.entity_setup(seq) if entity_mrr else None
        self.items: dict[str, list[torch.Tensor]] = {}
        self.layer_items: list[dict[str, list[torch.Tensor]]] = []
        self.entity_sums = torch.zeros(2, dtype=torch.float64, device=seq.device)  # rr, rank-1

    def add(
        self,
        start: int,
        seq: torch.Tensor,
        logits: torch.Tensor,
        layer_logits: list[torch.Tensor] | None = None,
    ) -> None:
        """A batch: items `start`.. of the split, `logits` (B, E, V) over their true tails."""
        tail = seq[:, self.family.entity_len + 2 :]
        for name, value in item_metrics(logits, tail).items():
            self.items.setdefault(name, []).append(value.cpu())
        if self.entity is not None:
            self.entity_sums += self.family.entity_batch_sums(
                seq, logits, self.entity, start, self.bar
            )
        else:
            self.bar.update(seq.shape[0])
        if self.per_layer:
            if not self.layer_items:
                self.layer_items = [{} for _ in layer_logits or []]
            for store, logits_l in zip(self.layer_items, layer_logits or []):
                for name, value in item_metrics(logits_l, tail).items():
                    store.setdefault(name, []).append(value.cpu())

    def result(self, n: int) -> dict[str, Any]:
        """The token metrics, `num_samples`, the entity metrics when computed, `per_layer`."""
        result: dict[str, Any] = {**summarise(self.items), "num_samples": n}
        if self.entity is not None:
            rr, correct = self.entity_sums.tolist()
            size = self.entity[0].size
            result.update(entity_mrr=rr / n, entity_acc=correct / n, num_entities=size)
        if self.per_layer:
            result["per_layer"] = [
                dict(layer=i, **summarise(store)) for i, store in enumerate(self.layer_items)
            ]
        return result
