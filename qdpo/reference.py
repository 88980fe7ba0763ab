"""Reference log-probs computed once, before training, and cached on disk.

The reference model never changes during a run, so scoring every pair once up front removes
the reference forward from every training step. The cache key covers everything that decides
the numbers: the model files, the init adapter, the token ids (tokenizer, data, length settings
all end up in them), the quantization and compute dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qdpo.batching import make_batch
from qdpo.model import ModelSource, cache_root
from qdpo.step import reference_scores
from qdpo.tokenize import TokenizedPair

FORMAT_VERSION = 1  # bump when the log-prob computation changes


def _files_signature(path: Path) -> list[tuple[str, int, int]]:
    """Name, size and mtime of every file of a model directory: cheap, and changes when weights do."""
    if not path.is_dir():
        return []
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.iterdir() if p.is_file())


def cache_key(source: ModelSource, init_adapter: str | None, pairs: list[TokenizedPair], dtype: torch.dtype,
              micro_batch_size: int, batches: list[list[int]], logits_chunk_size: int = 0, layout: str = "plain") -> str:
    """A hash of everything that determines the reference log-probs of these pairs."""
    digest = hashlib.sha256()
    digest.update(json.dumps({
        "version": FORMAT_VERSION,
        "model": source.path,
        "model_files": _files_signature(Path(source.path)),
        "gguf": source.gguf_file,
        "init_adapter": _files_signature(Path(init_adapter)) if init_adapter else None,
        "quant": "nf4-double",
        "dtype": str(dtype),
        "micro_batch_size": micro_batch_size,
        "logits_chunk_size": logits_chunk_size,  # another summation order: other float rounding
        "layout": layout,  # another attention mask and row width: other float rounding
    }).encode())
    for p in pairs:
        digest.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    digest.update(json.dumps(batches).encode())  # batch composition changes padding, hence float rounding
    return digest.hexdigest()[:24]


def compute_reference(model, pairs: list[TokenizedPair], batches: list[list[int]], pad_id: int, logits_chunk_size: int = 0,
                      layout: str = "plain") -> torch.Tensor:
    """[N, 2] reference log-probs (chosen, rejected) of every pair, scored in the given micro-batches."""
    table = torch.zeros(len(pairs), 2, dtype=torch.float32)
    was_training = model.training
    model.eval()
    for idx in batches:
        scores = reference_scores(model, make_batch([pairs[i] for i in idx], pad_id, layout), logits_chunk_size).logps.float().cpu()
        b = len(idx)
        table[idx, 0] = scores[:b]
        table[idx, 1] = scores[b:]
    model.train(was_training)
    return table


def load_or_compute(model, pairs: list[TokenizedPair], batches: list[list[int]], pad_id: int, key: str,
                    logits_chunk_size: int = 0, layout: str = "plain") -> tuple[torch.Tensor, bool]:
    """The reference table from the cache if present, else computed and stored; and whether it was cached."""
    path = cache_root() / "reference" / f"{key}.safetensors"
    if path.is_file():
        table = load_file(str(path))["logps"]
        if table.shape == (len(pairs), 2):
            return table, True
    table = compute_reference(model, pairs, batches, pad_id, logits_chunk_size, layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"logps": table}, str(tmp))
    tmp.replace(path)  # atomic: a killed run never leaves a truncated cache entry
    return table, False
