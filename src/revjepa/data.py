"""The inversion (reversal) dataset of Wang & Sun (2025): generate, load, validate.

On disk (the format of the authors' `data/inversionidcomb10.50000.30000/`):
  train.json  [{"input_text": [[e1...], [r], [mask]], "target_text": [[e2...]], "type": "train"|"atomic"}]
  valid.json  {"train": [...], "atomic": [...], "test": [...]}
  vocab.json  {token: id}: entity tokens, <mask>, <r_0>, <r_0_inv>, ..., <pad>, <PRED>

With `gen-data --identity_bridge` (Ma et al. 2026), vocab.json also holds <r_id> (last id), and
train.json ends with one identity fact `e <r_id> <mask> e` per entity, of type "identity".

In memory every split is one integer tensor of sequences `e1 + [r] + [mask] + e2` (shape N x L,
L = 2E + 2 where E is the number of tokens per entity) and a kind tensor; a batch is an index.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import REVERSE_TRAINING
from .errors import UserError

KINDS = ("train", "atomic", "test")
KIND_ID = {k: i for i, k in enumerate(KINDS)}
# The identity relation of --identity_bridge: `e <r_id> e`, its own inverse. Identity facts are
# training-only, type "identity" in train.json, and load as kind atomic (NTP, no JEPA row).
IDENTITY, IDENTITY_TYPE = "<r_id>", "identity"
_TRAIN_TYPES = {**KIND_ID, IDENTITY_TYPE: len(KINDS)}  # a loader-only code, mapped to atomic
MAX_JSON_BYTES = 4 << 30  # refuse absurd inputs before reading them
MASK, PAD, PRED = "<mask>", "<pad>", "<PRED>"
_RELATION = re.compile(r"^<r_(.+?)(_inv)?>$")


# ----------------------------------------------------------------------------- in-memory form


@dataclass
class Vocab:
    token_to_id: dict[str, int]
    mask_id: int
    pad_id: int
    pred_id: int
    inverse: torch.Tensor  # (V,) id of the inverse relation for relation tokens, -1 elsewhere
    is_entity: torch.Tensor  # (V,) bool: entity name tokens

    @property
    def size(self) -> int:
        return len(self.token_to_id)

    @property
    def relation_ids(self) -> torch.Tensor:
        return torch.nonzero(self.inverse >= 0).flatten()


@dataclass
class Split:
    seq: torch.Tensor  # (N, L) int64: e1 tokens, relation, <mask>, e2 tokens
    kind: torch.Tensor  # (N,) int64 index into KINDS

    def __len__(self) -> int:
        return int(self.seq.shape[0])


@dataclass
class Dataset:
    vocab: Vocab
    entity_len: int  # tokens per entity name (2 with --comb > 0, 1 in the abstract setting)
    train: Split | None
    valid: dict[str, Split]

    @property
    def seq_len(self) -> int:
        return 2 * self.entity_len + 2


def entity_table(train_seq: torch.Tensor, entity_len: int) -> torch.Tensor:
    """A run's entity table: the distinct entities (heads and tails) of its training data,
    sorted (lexicographically by token ids): (N_ent, E) int64. Both model families rank the
    true tail among these (`concept_mrr_full`, `entity_mrr`)."""
    e = entity_len
    names = torch.cat([train_seq[:, :e], train_seq[:, e + 2 :]])
    return torch.unique(names.cpu(), dim=0)


# ----------------------------------------------------------------------------- generation


@dataclass
class GenConfig:
    num_ga_entities: int = 50_000
    gb_ratio: float = 0.6
    num_rel_pairs: int = 6
    comb: int = 10
    test_size: int = 3_000
    seed: int = 42
    identity_bridge: bool = False  # add `e <r_id> e` for every entity (Ma et al. 2026)

    @property
    def num_gb_entities(self) -> int:
        return int(round(self.gb_ratio * self.num_ga_entities))

    def default_dir(self) -> str:
        n_a, n_b = self.num_ga_entities, self.num_gb_entities
        bridge = ".idbridge" if self.identity_bridge else ""
        if self.comb == 0:
            return f"data/inversionid.{n_a}.{n_b}{bridge}"
        return f"data/inversionidcomb{self.comb}.{n_a}.{n_b}{bridge}"

    def validate(self) -> None:
        if not math.isfinite(self.gb_ratio):
            raise UserError(f"--gb_ratio must be a finite number, got {self.gb_ratio}")
        n_a, n_b = self.num_ga_entities, self.num_gb_entities
        if n_a < 2 or n_a % 2:
            raise UserError(f"--num_ga_entities must be an even number >= 2, got {n_a}")
        if self.gb_ratio <= 0 or n_b < 2 or n_b % 2:
            raise UserError(
                f"--gb_ratio {self.gb_ratio} gives {n_b} group-B entities; need an even number >= 2"
            )
        if self.num_rel_pairs < 1:
            raise UserError(f"--num_rel_pairs must be >= 1, got {self.num_rel_pairs}")
        if self.comb < 0:
            raise UserError(f"--comb must be >= 0, got {self.comb}")
        if self.comb:
            n = n_a + n_b
            if n % self.comb:
                raise UserError(f"--comb {self.comb} must divide the entity count {n}")
            if self.comb > n // self.comb:
                raise UserError(f"--comb {self.comb} is too large for {n} entities")
        if self.test_size < 1:
            raise UserError(f"--test_size must be >= 1, got {self.test_size}")
        n_atomic = self.num_rel_pairs * n_b // 2
        if self.test_size > n_atomic:
            raise UserError(
                f"--test_size {self.test_size} exceeds the {n_atomic} atomic/test facts available"
            )
        n_train = self.num_rel_pairs * n_a
        if self.test_size > n_train:
            raise UserError(
                f"--test_size {self.test_size} exceeds the {n_train} group-A train facts available"
            )
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")


@dataclass
class Generated:
    vocab: dict[str, int]
    train_seq: np.ndarray  # (N, L) int64
    train_kind: np.ndarray  # (N,) int64
    valid: dict[str, np.ndarray]  # split -> (n, L)
    entity_len: int
    identity: np.ndarray | None = None  # (n_entities, L) `e <r_id> <mask> e`, or None


def _entities(cfg: GenConfig, rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The entity name tokens, their random id order (token_order[id] = name index) and the
    entities as rows of token ids (n, E), the first random draws of `generate`."""
    n = cfg.num_ga_entities + cfg.num_gb_entities
    if cfg.comb:
        # Entity (i, s) has first name f_i and last name l_{(i + shift_s) mod m}: every first and
        # every last name is used by exactly `comb` entities and no (first, last) pair repeats.
        m = n // cfg.comb
        shifts = rng.choice(m, size=cfg.comb, replace=False)
        first = np.repeat(np.arange(m), cfg.comb)
        last = (first + np.tile(shifts, m)) % m
        names = [f"<f_{i}>" for i in range(m)] + [f"<l_{j}>" for j in range(m)]
        token_order = rng.permutation(len(names))  # entity tokens in random id order
        token_id = np.empty(len(names), dtype=np.int64)
        token_id[token_order] = np.arange(len(names))
        return names, token_order, np.stack([token_id[first], token_id[m + last]], axis=1)
    names = [f"<e_{i}>" for i in range(n)]
    token_order = rng.permutation(n)
    token_id = np.empty(n, dtype=np.int64)
    token_id[token_order] = np.arange(n)
    return names, token_order, token_id[:, None]


def generate(cfg: GenConfig) -> Generated:
    """Build the dataset in memory, vectorized; the same config always gives the same arrays."""
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    n_a, n_b = cfg.num_ga_entities, cfg.num_gb_entities
    n = n_a + n_b
    names, token_order, entities = _entities(cfg, rng)
    entities = entities[rng.permutation(n)]  # random assignment to groups A and B
    group_a, group_b = entities[:n_a], entities[n_a:]

    vocab_tokens = [names[i] for i in token_order] + [MASK]
    for r in range(cfg.num_rel_pairs):
        vocab_tokens += [f"<r_{r}>", f"<r_{r}_inv>"]
    vocab_tokens += [PAD, PRED]
    if cfg.identity_bridge:
        vocab_tokens.append(IDENTITY)  # last, so that every other token keeps its id
    vocab = {tok: i for i, tok in enumerate(vocab_tokens)}
    mask_id = vocab[MASK]

    def facts(head: np.ndarray, rel: int, tail: np.ndarray) -> np.ndarray:
        k = len(head)
        return np.concatenate(
            [head, np.full((k, 1), rel), np.full((k, 1), mask_id), tail], axis=1
        ).astype(np.int64)

    train_parts, atomic_parts, test_parts = [], [], []
    for r in range(cfg.num_rel_pairs):
        rel, inv = vocab[f"<r_{r}>"], vocab[f"<r_{r}_inv>"]
        pa = group_a[rng.permutation(n_a)]
        x, y = pa[0::2], pa[1::2]
        train_parts += [facts(x, rel, y), facts(y, inv, x)]
        pb = group_b[rng.permutation(n_b)]
        x, y = pb[0::2], pb[1::2]
        forward_seen = rng.integers(0, 2, size=len(x)).astype(bool)[:, None]
        fwd, rev = facts(x, rel, y), facts(y, inv, x)
        atomic_parts.append(np.where(forward_seen, fwd, rev))
        test_parts.append(np.where(forward_seen, rev, fwd))
    train = np.concatenate(train_parts)
    atomic = np.concatenate(atomic_parts)
    test = np.concatenate(test_parts)

    train_seq = np.concatenate([train, atomic])
    train_kind = np.concatenate(
        [np.full(len(train), KIND_ID["train"]), np.full(len(atomic), KIND_ID["atomic"])]
    ).astype(np.int64)
    order = rng.permutation(len(train_seq))
    train_seq, train_kind = train_seq[order], train_kind[order]

    valid = {
        "train": train[rng.choice(len(train), cfg.test_size, replace=False)],
        "atomic": atomic[rng.choice(len(atomic), cfg.test_size, replace=False)],
        "test": test[rng.choice(len(test), cfg.test_size, replace=False)],
    }
    # no random draw: the plain dataset's items and splits come out exactly as without the bridge
    identity = facts(entities, vocab[IDENTITY], entities) if cfg.identity_bridge else None
    return Generated(vocab, train_seq, train_kind, valid, entities.shape[1], identity)


def _items_json(seq: np.ndarray, kinds: list[str] | str, entity_len: int) -> str:
    e = entity_len
    head = seq[:, :e].tolist()
    rel = seq[:, e].tolist()
    mask = seq[:, e + 1].tolist()
    tail = seq[:, e + 2 :].tolist()
    if isinstance(kinds, str):
        kinds = [kinds] * len(head)
    items = [
        {"input_text": [h, [r], [m]], "target_text": [t], "type": k}
        for h, r, m, t, k in zip(head, rel, mask, tail, kinds)
    ]
    return json.dumps(items)


def write_generated(gen: Generated, out_dir: Path) -> dict[str, Path]:
    """Write train/valid/vocab JSON atomically (temporary file + rename)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot create the output directory: {exc}") from None
    train_seq, kinds = gen.train_seq, [KINDS[k] for k in gen.train_kind.tolist()]
    if gen.identity is not None:  # after the plain items, which stay as they are without them
        train_seq = np.concatenate([train_seq, gen.identity])
        kinds += [IDENTITY_TYPE] * len(gen.identity)
    valid_json = (
        "{"
        + ", ".join(f'"{s}": {_items_json(gen.valid[s], s, gen.entity_len)}' for s in KINDS)
        + "}"
    )
    files = {
        "train.json": _items_json(train_seq, kinds, gen.entity_len),
        "valid.json": valid_json,
        "vocab.json": json.dumps(gen.vocab),
    }
    written = {}
    for name, text in files.items():
        path = out_dir / name
        try:
            atomic_write_bytes(path, text.encode())
        except OSError as exc:
            raise UserError(f"{path}: cannot write: {exc}") from None
        written[name] = path
    return written


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------- loading


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise UserError(f"{path}: {size} bytes is larger than the {MAX_JSON_BYTES} allowed")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None


def load_vocab(path: Path) -> Vocab:
    text = _read_text(path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON: {exc}") from None
    return vocab_from_mapping(raw, str(path))


def vocab_from_mapping(raw: object, where: str) -> Vocab:
    """Validate a token -> id mapping and derive the special ids and relation table by name."""
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: expected a non-empty JSON object token -> id")
    ids = list(raw.values())
    if not all(type(i) is int for i in ids):
        raise UserError(f"{where}: every id must be an integer")
    if sorted(ids) != list(range(len(ids))):
        raise UserError(f"{where}: ids must be exactly 0..{len(ids) - 1}, each once")
    for tok in (MASK, PAD, PRED):
        if tok not in raw:
            raise UserError(f"{where}: vocabulary lacks the required token {tok}")
    v = len(raw)
    inverse = torch.full((v,), -1, dtype=torch.int64)
    is_entity = torch.ones(v, dtype=torch.bool)
    for tok in (MASK, PAD, PRED):
        is_entity[raw[tok]] = False
    relations = 0
    for tok, i in raw.items():
        match = _RELATION.match(tok)
        if not match:
            continue
        is_entity[i] = False
        name, inv = match.groups()
        partner = f"<r_{name}>" if inv else f"<r_{name}_inv>"
        if tok == IDENTITY:
            partner = tok  # the identity relation is its own inverse
        elif name == "id":
            raise UserError(f"{where}: {tok}: {IDENTITY} is its own inverse, there is no {tok}")
        if partner not in raw:
            raise UserError(f"{where}: relation {tok} has no inverse {partner}")
        inverse[i] = raw[partner]
        relations += 1
    if relations == 0:
        raise UserError(f"{where}: vocabulary has no relation tokens <r_i>/<r_i_inv>")
    return Vocab(raw, raw[MASK], raw[PAD], raw[PRED], inverse, is_entity)


_WS = re.compile(r"[ \t\n\r]*")


def _iter_array(text: str, path: Path, start: int = 0, what: str = "array"):
    """Yield (index, item) of a JSON array one item at a time (the parsed JSON is never whole)."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text, start).end()
    if text[pos : pos + 1] != "[":
        raise UserError(f"{path}: expected a JSON array for {what}")
    pos = _WS.match(text, pos + 1).end()
    if text[pos : pos + 1] == "]":
        return _end_of_array(text, pos, path, what)
    index = 0
    while True:
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: malformed JSON in {what} item {index}: {exc}") from None
        yield index, item
        index += 1
        pos = _WS.match(text, pos).end()
        ch = text[pos : pos + 1]
        if ch == "]":
            return _end_of_array(text, pos, path, what)
        if ch != ",":
            raise UserError(f"{path}: malformed JSON after {what} item {index - 1}")
        pos = _WS.match(text, pos + 1).end()


def _end_of_array(text: str, pos: int, path: Path, what: str) -> int:
    """`pos` is at the closing `]` of a top-level array: only whitespace may follow."""
    end = _WS.match(text, pos + 1).end()
    if end != len(text):
        raise UserError(f"{path}: malformed JSON: unexpected data after the {what}")
    return end


def _items_to_split(
    items, path: Path, what: str, vocab: Vocab, entity_len: int | None, expected_kind: str | None
) -> tuple[Split, int]:
    rows: list[list[int]] = []
    kinds: list[int] = []
    for index, item in items:
        try:
            inp, tgt, kind = item["input_text"], item["target_text"], item["type"]
            if len(inp) != 3 or len(tgt) != 1 or len(inp[1]) != 1 or len(inp[2]) != 1:
                raise ValueError
            head, tail = inp[0], tgt[0]
            if entity_len is None:
                entity_len = len(head)
            if len(head) != entity_len or len(tail) != entity_len or entity_len < 1:
                raise ValueError
            rows.append(head + inp[1] + inp[2] + tail)
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"{path}: {what} item {index} has the wrong shape (expected input_text "
                f"[[e1 x{entity_len or 'E'}], [r], [mask]], target_text [[e2]], type)"
            ) from None
        if (
            not isinstance(kind, str)
            or kind not in _TRAIN_TYPES
            or (expected_kind and kind != expected_kind)
        ):
            allowed = expected_kind or "/".join(_TRAIN_TYPES)
            raise UserError(f"{path}: {what} item {index} has type {kind!r}, expected {allowed}")
        kinds.append(_TRAIN_TYPES[kind])
    if not rows:
        raise UserError(f"{path}: {what} is empty")
    if not all(type(x) is int for row in rows for x in row):
        raise UserError(f"{path}: {what} contains a token id that is not an integer")
    try:
        seq = torch.tensor(rows, dtype=torch.int64)
    except (OverflowError, RuntimeError, ValueError):  # an id beyond int64
        raise UserError(
            f"{path}: {what} has a token id outside the vocabulary (size {vocab.size})"
        ) from None
    _check_ids(seq, vocab, path, what, entity_len)
    kind = torch.tensor(kinds, dtype=torch.int64)
    _identity_as_atomic(seq, kind, vocab, f"{path}: {what}", entity_len)
    return Split(seq, kind), entity_len


def _identity_as_atomic(
    seq: torch.Tensor, kind: torch.Tensor, vocab: Vocab, where: str, e: int
) -> None:
    """Check that exactly the items of type identity are `e <r_id> <mask> e`, then give them
    kind atomic in place: NTP items like atomic facts (a JEPA row would pair the item with
    itself), and no new kind for the evaluation splits, which never hold them."""
    identity = kind == _TRAIN_TYPES[IDENTITY_TYPE]
    rid = vocab.token_to_id.get(IDENTITY, -1)
    bad = (seq[:, e] == rid) != identity
    bad |= identity & (seq[:, :e] != seq[:, e + 2 :]).any(1)
    if bad.any():
        raise UserError(
            f"{where} item {int(bad.nonzero()[0])}: exactly the items of type {IDENTITY_TYPE!r} "
            f"are identity facts `e {IDENTITY} <mask> e`"
        )
    kind[identity] = KIND_ID["atomic"]


def _check_ids(seq: torch.Tensor, vocab: Vocab, path: Path, what: str, e: int) -> None:
    bad = (seq < 0) | (seq >= vocab.size)
    if bad.any():
        row = int(bad.any(1).nonzero()[0])
        raise UserError(
            f"{path}: {what} item {row} has a token id outside the vocabulary (size {vocab.size})"
        )
    checks = [
        (~vocab.is_entity[seq[:, :e]].all(1), "an entity position holds a non-entity token"),
        (~vocab.is_entity[seq[:, e + 2 :]].all(1), "an entity position holds a non-entity token"),
        (vocab.inverse[seq[:, e]] < 0, "the relation position holds a non-relation token"),
        (seq[:, e + 1] != vocab.mask_id, "the mask position does not hold <mask>"),
    ]
    for bad_rows, problem in checks:
        if bad_rows.any():
            raise UserError(f"{path}: {what} item {int(bad_rows.nonzero()[0])}: {problem}")


def load_dataset(data_dir: str | Path, with_train: bool = True) -> Dataset:
    """Load and validate a dataset directory into integer tensors."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data directory not found")
    vocab = load_vocab(data_dir / "vocab.json")
    valid_path = data_dir / "valid.json"
    valid = _load_valid(valid_path, vocab)
    entity_len = valid["test"].seq.shape[1] // 2 - 1
    train = None
    if with_train:
        train_path = data_dir / "train.json"
        text = _read_text(train_path)
        train, e = _items_to_split(
            _iter_array(text, train_path), train_path, "train.json", vocab, entity_len, None
        )
        del text
        if bool((train.kind == KIND_ID["test"]).any()):
            raise UserError(f"{train_path}: contains items of type 'test' (held-out facts)")
    return Dataset(vocab, entity_len, train, valid)


def _load_valid(path: Path, vocab: Vocab) -> dict[str, Split]:
    text = _read_text(path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected an object with splits train, atomic, test")
    splits: dict[str, Split] = {}
    entity_len = None
    for name in KINDS:
        if name not in raw:
            raise UserError(f"{path}: missing split {name!r}")
        if not isinstance(raw[name], list):
            raise UserError(f"{path}: split {name!r} is not a list")
        splits[name], entity_len = _items_to_split(
            enumerate(raw[name]), path, f"split {name!r}", vocab, entity_len, name
        )
    return splits


def summarize(ds: Dataset) -> dict[str, object]:
    out: dict[str, object] = {
        "vocab_size": ds.vocab.size,
        "entity_tokens": int(ds.vocab.is_entity.sum()),
        "relations": int((ds.vocab.inverse >= 0).sum()),
        "tokens_per_entity": ds.entity_len,
        "mask_id": ds.vocab.mask_id,
        "pad_id": ds.vocab.pad_id,
        "pred_id": ds.vocab.pred_id,
        "identity_bridge": IDENTITY in ds.vocab.token_to_id,
    }
    if ds.train is not None:
        out["train_items"] = len(ds.train)
        # identity facts load as kind atomic: told apart by their relation
        identity = ds.train.seq[:, ds.entity_len] == ds.vocab.token_to_id.get(IDENTITY, -1)
        out["train_kind_train"] = int((ds.train.kind == KIND_ID["train"]).sum())
        out["train_kind_atomic"] = int(((ds.train.kind == KIND_ID["atomic"]) & ~identity).sum())
        out["train_identity"] = int(identity.sum())
    for name, split in ds.valid.items():
        out[f"valid_{name}"] = len(split)
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# ----------------------------------------------------------------------------- batches


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-to-device copy that does not wait for the GPU's queued work: from pinned memory
    (a copy from pageable memory may synchronise the stream first)."""
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def stream_generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A generator for one (seed, purpose, index): no two runs or steps share a stream."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=stream_generator(seed, "epoch", epoch))


def loss_dropout_keep(seed: int, step: int, n: int, p: float) -> torch.Tensor:
    """Per-item keep mask of the global batch, a pure function of (seed, step)."""
    return torch.rand(n, generator=stream_generator(seed, "loss_dropout", step)) >= p


def reverse_sequences(seq: torch.Tensor, entity_len: int, how: str) -> torch.Tensor:
    """Reverse training's reversal of every row of `seq` (N, L) at once, the relation token
    unchanged (r, not r_inv) and the template `X r <mask> Y` kept:
      entity  e1 r <mask> e2 -> e2 r <mask> e1            (f1 l1 r m f2 l2 -> f2 l2 r m f1 l1)
      token   every token reversed, r <mask> kept in order (f1 l1 r m f2 l2 -> l2 f2 r m l1 f1)
    With one-token entities the two coincide."""
    if how not in REVERSE_TRAINING[1:]:
        raise ValueError(f"unknown reversal {how!r}")
    e = entity_len
    head, middle, tail = seq[:, :e], seq[:, e : e + 2], seq[:, e + 2 :]
    if how == "token":
        head, tail = head.flip(1), tail.flip(1)
    return torch.cat([tail, middle, head], 1)


def training_pool(train: Split, entity_len: int, how: str) -> Split:
    """The items the batch sampler draws from: the training split, and with reverse training
    (`how` entity or token) one reversed copy of every item after it, of its source's kind (a
    reversed train pair's JEPA partner `Y r_inv X` is the reversal of the pair's other item,
    itself in the pool). Same batch size and steps: half of each batch is reversed on average."""
    if how == "none":
        return train
    reversed_seq = reverse_sequences(train.seq, entity_len, how)
    return Split(torch.cat([train.seq, reversed_seq]), train.kind.repeat(2))


@dataclass
class Batch:
    seq: torch.Tensor  # (B, L) on the training device
    kind: torch.Tensor  # (B,) on the host: the model plans its packing there
    keep: torch.Tensor | None  # (B,) loss-dropout keep mask on the device, or None


class BatchSampler:
    """The batch of a step is a pure function of (seed, step): one seeded permutation per
    epoch, global batch = batch_size x world, rank r takes slice r. So resuming needs only the
    step, and 1-process and N-process runs see the same examples."""

    def __init__(
        self,
        split: Split,
        *,
        seed: int,
        batch_size: int,
        rank: int,
        world: int,
        steps_per_epoch: int,
        loss_dropout: float,
        device: torch.device,
    ) -> None:
        self.seq = split.seq.to(device)
        self.kind = split.kind
        self.n = len(split)
        self.seed, self.batch_size, self.rank = seed, batch_size, rank
        self.global_batch = batch_size * world
        self.steps_per_epoch, self.loss_dropout, self.device = steps_per_epoch, loss_dropout, device
        self._perm: tuple[int, torch.Tensor] | None = None

    def _local(self, global_values: torch.Tensor) -> torch.Tensor:
        return global_values[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def batch(self, step: int) -> Batch:
        """This rank's batch of the update with 0-based index `step`: a tensor index."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.seed, epoch, self.n))
        idx = self._local(self._perm[1][pos * self.global_batch : (pos + 1) * self.global_batch])
        keep = None
        if self.loss_dropout > 0:
            mask = loss_dropout_keep(self.seed, step, self.global_batch, self.loss_dropout)
            keep = to_device(self._local(mask), self.device)
        return Batch(self.seq[to_device(idx, self.device)], self.kind[idx], keep)
