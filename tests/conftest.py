"""Shared fixtures: small generated datasets (written once per session, never modified)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from revjepa.data import GenConfig, generate, write_generated

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
