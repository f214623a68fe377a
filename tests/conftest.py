"""Shared fixtures: small generated datasets (written once per session, never modified)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from revjepa.data import GenConfig, generate, write_generated

# One intra-op thread for every test and every process a test starts (they inherit the
# variable): many tests compare separately trained runs bit for bit, and on our 2-core VM with
# 2 threads 5 of 149 runs of one command came out different in the last bits while
# other jobs loaded the machine (0 in 30 with one thread; README "Failure and recovery").
# Tests that need another count set it explicitly.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# 1000 group-A + 600 group-B entities, 160 first and 160 last names shared by 10 entities each.
SMALL_COMB = dict(
    num_ga_entities=1000, gb_ratio=0.6, num_rel_pairs=3, comb=10, test_size=100, seed=7
)
# The abstract setting: one token per entity.
SMALL_ABSTRACT = dict(
    num_ga_entities=400, gb_ratio=0.5, num_rel_pairs=2, comb=0, test_size=50, seed=3
)


@pytest.fixture(scope="session")
def small_cfg() -> GenConfig:
    return GenConfig(**SMALL_COMB)


@pytest.fixture(scope="session")
def small_gen(small_cfg):
    return generate(small_cfg)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory, small_gen) -> Path:
    """A written comb-10 dataset; read-only by convention (copy it with `small_copy`)."""
    out = tmp_path_factory.mktemp("small") / "inversionidcomb10"
    write_generated(small_gen, out)
    return out


@pytest.fixture(scope="session")
def abstract_cfg() -> GenConfig:
    return GenConfig(**SMALL_ABSTRACT)


@pytest.fixture(scope="session")
def abstract_gen(abstract_cfg):
    return generate(abstract_cfg)


@pytest.fixture(scope="session")
def abstract_dir(tmp_path_factory, abstract_gen) -> Path:
    out = tmp_path_factory.mktemp("abstract") / "inversionid"
    write_generated(abstract_gen, out)
    return out


@pytest.fixture
def small_copy(small_dir, tmp_path) -> Path:
    """A private, modifiable copy of the small comb dataset."""
    dst = tmp_path / "ds"
    shutil.copytree(small_dir, dst)
    return dst
