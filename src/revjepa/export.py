"""Export a checkpoint's model as a Hugging Face `save_pretrained` directory (+ vocab).

gpt2_jepa: GPT2LMHeadModel.from_pretrained(OUT_DIR) loads it. concept_jepa: config.json (the
architecture) + model.safetensors (recognition/semantic/memory weights and the entity table);
`revjepa.families.concept_jepa.load_pretrained(OUT_DIR)` rebuilds the model.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import load_checkpoint
from .errors import UserError
from .families import model_from_checkpoint


def export_checkpoint(checkpoint: Path, out_dir: Path) -> Path:
    """config.json + model.safetensors (the family's export_pretrained), vocab.json, revjepa.json."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: output directory exists and is not empty")
    state = load_checkpoint(checkpoint)
    model, config = model_from_checkpoint(state, None, str(checkpoint))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.export_pretrained(out_dir)
    (out_dir / "vocab.json").write_text(json.dumps(state["vocab"]))
    meta = {
        "step": int(state["step"]),
        "family": config.model.family,
        "config": config.to_dict(),
        "entity_len": int(state["entity_len"]),
        "source_checkpoint": str(checkpoint),
    }
    (out_dir / "revjepa.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir
