"""Reference log-probs computed once, before training, and cached on disk.

The reference model never changes during a run, so scoring every pair once up front removes
the reference forward from every training step. The cache key covers everything that can change
the numbers: where the model and init adapter are and what their files hold (or the hub commit),
the token ids (tokenizer, data, length settings all end up in them), the batching, the
quantization and compute dtype, the device, and the versions of the libraries that compute them.
The cache is bounded: after each write the least recently used tables beyond the limit go.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from qdpo.attention import IMPLEMENTATION
from qdpo.batching import make_batch
from qdpo.distributed import SINGLE, World, reshard
from qdpo.errors import UserError
from qdpo.faults import crash_point
from qdpo.fs import write_atomically, write_json, write_text
from qdpo.hub import looks_like_hub_id
from qdpo.model import ModelSource, cache_root
from qdpo.quiet import progress_bar
from qdpo.step import reference_scores
from qdpo.tokenize import TokenizedPair

FORMAT_VERSION = 4  # bump when the log-prob computation or the key changes: every older table is then a miss
# 4: sliding windows that cut a row, and soft-capped scores, run in blocks on every layout, not the dense mask

LIBRARIES = ("torch", "transformers", "bitsandbytes", "peft", "qdpo")  # their versions are part of the key
QUANTIZATION = {"type": "nf4", "double_quant": True}  # as load_base_4bit sets it; the compute dtype is keyed apart
# bitsandbytes 0.50 repacked 4-bit weights for AVX512-BF16 CPUs and computed wrong tables with them; qdpo keeps
# that repack off, and saying so in every key means no table from a run that had it on can ever be reused.
ALWAYS = {"bnb_cpu_repack": "off"}

# Bound: a table is 8 bytes per pair (0.8 MB for 100k pairs), so the count is what bounds the cache in practice:
# 200 tables covers many datasets x models x batch settings while keeping `qdpo cache list` readable. The byte
# bound only matters for tables of tens of millions of pairs; it keeps the directory from ever reaching many GB.
MAX_ENTRIES_ENV = "QDPO_REFERENCE_CACHE_ENTRIES"
DEFAULT_MAX_ENTRIES = 200
MAX_BYTES = 2 * 10**9

# Model files are hashed in full (exact, unlike a sample of each file), which reads a 7B fp16 checkpoint once:
# ~15 s at the ~1 GB/s sha256 runs at. The digest is remembered per file under (size, mtime_ns, ctime_ns, inode,
# device): mtime can be set back (cp -p, rsync -t, os.utime), but ctime cannot and changes with every write, so a
# rewrite that keeps size and mtime still misses. As in git's "racily clean" rule, a file changed within the last
# RACY_SECONDS is not remembered, since another write within the same timestamp tick would keep its ctime too.
MEMO_MIN_BYTES = 16 << 20  # smaller files are cheaper to hash again than to look up
RACY_SECONDS = 2.0
MEMO_LIMIT = 2000  # remembered files at most; the least recently hashed go first
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")  # pick CPU kernels


def reference_dir() -> Path:
    """Where the reference tables live: <cache>/reference (cache: $QDPO_CACHE or ~/.cache/qdpo)."""
    return cache_root() / "reference"


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _stat_id(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class _Memo:
    """Full sha256 of large files, remembered in <cache>/reference/.file-hashes.json (a speed-up only)."""

    def __init__(self) -> None:
        self.path = reference_dir() / ".file-hashes.json"
        self.changed = False
        try:
            self.entries: dict[str, dict] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        if not isinstance(self.entries, dict):
            self.entries = {}

    def digest(self, path: Path) -> str:
        path = path.resolve()
        st = path.stat()
        if st.st_size < MEMO_MIN_BYTES:
            return _hash_file(path)
        ident = _stat_id(st)
        hit = self.entries.get(str(path))
        if isinstance(hit, dict) and hit.get("stat") == ident and isinstance(hit.get("sha256"), str):
            return hit["sha256"]
        value = _hash_file(path)
        after = path.stat()
        if _stat_id(after) == ident and time.time() - after.st_ctime > RACY_SECONDS:
            self.entries[str(path)] = {"stat": ident, "sha256": value, "hashed": time.time()}
            self.changed = True
        return value

    def save(self) -> None:
        if not self.changed:
            return
        keep = sorted(self.entries.items(), key=lambda kv: kv[1].get("hashed", 0) if isinstance(kv[1], dict) else 0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, json.dumps(dict(keep[-MEMO_LIMIT:])))
        except OSError:
            pass  # not remembered: the next run hashes the files again, nothing worse


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that compute the reference log-probs."""
    return {name: _version(name) for name in LIBRARIES}


def hub_revision(repo_id: str) -> str | None:
    """The commit the local Hugging Face cache resolves `main` of a hub model to (no network), or None."""
    from huggingface_hub import constants, try_to_load_from_cache

    cache_dir = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except ValueError:  # not a valid repo id
        return None
    if isinstance(found, str):
        return Path(found).parent.name  # .../snapshots/<commit>/config.json
    ref = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def _model_fingerprint(source: ModelSource, memo: _Memo) -> dict:
    """A local model by its resolved directory and the sha256 of every file in it; a hub model by its commit."""
    local = Path(source.path).expanduser()
    gguf = str(Path(source.gguf_file).expanduser().resolve()) if source.gguf_file else None
    if local.is_dir():
        root = local.resolve()
        # Top-level files only: that is what from_pretrained reads. Hidden ones (.gitattributes, .cache/) are not read.
        files = {p.name: memo.digest(p) for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")}
        return {"dir": str(root), "files": files, "gguf": gguf}
    if not local.exists() and looks_like_hub_id(source.path):
        revision = hub_revision(source.path)
        return {"hub": source.path, "revision": revision or "unknown: not in the local Hugging Face cache"}
    return {"missing": str(local.resolve()), "gguf": gguf}


def _adapter_fingerprint(init_adapter: str | None, memo: _Memo) -> dict | None:
    if init_adapter is None:
        return None
    root = Path(init_adapter).expanduser().resolve()
    return {
        "dir": str(root),
        "files": {n: memo.digest(root / n) if (root / n).is_file() else None for n in ADAPTER_FILES},
    }


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((row for row in f if row.startswith("flags")), "")
    except OSError:
        return []
    present = set(line.split(":", 1)[-1].split())
    return [flag for flag in CPU_FLAGS if flag in present]


def device_fingerprint(device: torch.device | str | None) -> dict | None:
    """What of the device decides the kernels, hence the rounding: GPU model and CUDA, or CPU features."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "capability": list(torch.cuda.get_device_capability(index)),
            "cuda": torch.version.cuda,
            "tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    return {
        "type": device.type,
        "machine": platform.machine(),
        "torch_cpu": torch.backends.cpu.get_cpu_capability(),
        "flags": _cpu_flags(),
    }


class CacheKey(str):
    """The key (hex), carrying what it was computed for; load_or_compute writes that next to the table."""

    about: dict


def cache_key(
    source: ModelSource,
    init_adapter: str | None,
    pairs: list[TokenizedPair],
    dtype: torch.dtype,
    micro_batch_size: int,
    batches: list[list[int]],
    logits_chunk_size: int = 0,
    layout: str = "plain",
    *,
    device: torch.device | str | None = None,
    extra: dict | None = None,
) -> CacheKey:
    """A hash of everything that determines the reference log-probs of these pairs.

    extra: any further JSON-able settings the caller knows decide the numbers (e.g. {"lora_dropout": 0.0}).
    """
    memo = _Memo()
    inputs = {
        "version": FORMAT_VERSION,
        "model": _model_fingerprint(source, memo),
        "init_adapter": _adapter_fingerprint(init_adapter, memo),
        "quantization": {**QUANTIZATION, "compute_dtype": str(dtype)},
        "micro_batch_size": micro_batch_size,
        "logits_chunk_size": logits_chunk_size,  # another summation order: other float rounding
        "layout": layout,  # another attention mask and row width: other float rounding
        # How the shared-prompt rows attend (qdpo.attention's causal calls, or the dense mask before them):
        # the same numbers up to float rounding, but tables are compared exactly.
        "attention": IMPLEMENTATION if layout != "plain" else None,
        "device": device_fingerprint(device),
        "libraries": library_versions(),
        "extra": extra or {},
        **ALWAYS,
    }
    memo.save()
    data = hashlib.sha256()
    for p in pairs:
        data.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())
    digest.update(data.hexdigest().encode())
    digest.update(json.dumps(batches).encode())  # batch composition changes padding, hence float rounding
    key = CacheKey(digest.hexdigest()[:24])
    key.about = {
        "model": source.name,
        "init_adapter": inputs["init_adapter"] and inputs["init_adapter"]["dir"],
        "pairs": len(pairs),
        "data_sha256": data.hexdigest()[:16],
        "inputs": inputs,
    }
    return key


def compute_reference(
    model,
    pairs: list[TokenizedPair],
    batches: list[list[int]],
    pad_id: int,
    logits_chunk_size: int = 0,
    layout: str = "plain",
    ld_alpha: float | None = None,
    world: World = SINGLE,
    split: str = "",
) -> torch.Tensor:
    """[N, 2] reference log-probs (chosen, rejected) of the pairs in the given micro-batches; NaN for the others.

    ld_alpha set: LD-DPO's weighted log-probs (the tail past the pair's shorter response counts ld_alpha times).
    With several ranks, each scores its share of the micro-batches and the shares are merged.
    """
    table = torch.full((len(pairs), 2), float("nan"), dtype=torch.float32)  # an unscored pair can never pass as 0
    was_training = model.training
    model.eval()
    for idx, counts in progress_bar(
        world.share_evenly(batches), desc=f"reference ({split})" if split else "reference", unit="batch", leave=False
    ):
        crash_point("reference")
        scores = (
            reference_scores(model, make_batch([pairs[i] for i in idx], pad_id, layout), logits_chunk_size)
            .ld_logps(ld_alpha)
            .float()
            .cpu()
        )
        if not counts:
            continue
        b = len(idx)
        table[idx, 0] = scores[:b]
        table[idx, 1] = scores[b:]
    model.train(was_training)
    if world.size > 1:
        reshard(model)
    return world.merge_table(table)


def _checksum(table: torch.Tensor) -> str:
    return hashlib.sha256(table.contiguous().numpy().tobytes()).hexdigest()


def _read_table(path: Path) -> tuple[torch.Tensor | None, str | None]:
    """The cached table, or None and why it cannot be used (damaged, truncated, or its checksum does not match)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            table, stored = f.get_tensor("logps"), (f.metadata() or {}).get("sha256")
    except FileNotFoundError:
        return None, None  # removed meanwhile: nothing to report
    except (OSError, KeyError, SafetensorError, ValueError) as e:
        return None, f"unreadable ({type(e).__name__})"
    if stored != _checksum(table):  # a bit flip or a partial overwrite that still parses
        return None, "checksum mismatch"
    return table, None


def cached_table(key: str, num_pairs: int, notes: list[str] | None = None) -> torch.Tensor | None:
    """The reference table stored under key, if present, intact and of the right size; else None.

    A damaged entry (unreadable, or its checksum does not match) is never used: it is reported in notes.
    """
    path = reference_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    table, damage = _read_table(path)
    if damage and notes is not None:
        notes.append(f"reference cache entry {path.name} is damaged ({damage}): computing it again")
    if table is None or table.shape != (num_pairs, 2):
        return None
    try:
        os.utime(path)  # last used now: eviction drops the least recently used tables first
    except OSError:
        pass
    return table


def store_table(table: torch.Tensor, key: str) -> None:
    """Store a computed reference table under key (atomically, with its description), then evict old ones."""
    directory = reference_dir()
    path = directory / f"{key}.safetensors"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # atomic: a killed run never leaves a truncated cache entry under the key
        checksum = _checksum(table)
        write_atomically(path, lambda tmp: save_file({"logps": table}, str(tmp), metadata={"sha256": checksum}))
        about = getattr(key, "about", None)
        if about is not None:  # what the table is for, for `qdpo cache list`
            sidecar = path.with_suffix(".json")
            scored = int((~torch.isnan(table).any(dim=1)).sum())  # a run scores only the micro-batches it uses
            write_json(sidecar, {**about, "scored": scored, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except OSError as e:
        raise UserError(
            f"cannot write the reference cache in {directory} ({e.strerror or e}); set QDPO_CACHE to a "
            "writable directory or precompute_ref_log_probs=false."
        ) from None
    evict(keep=path)


def load_or_compute(
    model,
    pairs: list[TokenizedPair],
    batches: list[list[int]],
    pad_id: int,
    key: str,
    logits_chunk_size: int = 0,
    layout: str = "plain",
    notes: list[str] | None = None,
    ld_alpha: float | None = None,
    world: World = SINGLE,
    split: str = "",
) -> tuple[torch.Tensor, int]:
    """The reference table with every pair of `batches` scored, and how many of those micro-batches were scored now.

    key covers the composition of all the micro-batches a table may ever hold (an epoch's), so a later run that
    needs more of them (a larger max_steps) finds the entry, scores only the micro-batches it lacks (NaN rows), and
    stores the grown table. A pair's score depends only on its own micro-batch, so the merged table is the one a
    single pass would have written. With several ranks, rank 0 reads the cache; each rank scores its share of the
    missing micro-batches, the shares are merged, and rank 0 stores the full table.
    """
    table = world.agree(cached_table(key, len(pairs), notes) if world.main else None)
    missing = batches if table is None else [b for b in batches if torch.isnan(table[b]).any()]
    if not missing:
        return table, 0
    scored = compute_reference(model, pairs, missing, pad_id, logits_chunk_size, layout, ld_alpha, world, split)
    table = scored if table is None else torch.where(torch.isnan(scored), table, scored)
    if world.main:
        store_table(table, key)
    return table, len(missing)


@dataclass
class CacheEntry:
    """One cached reference table."""

    path: Path
    bytes: int  # table and its description
    used: float  # last written or reused (the file's mtime)
    about: dict | None  # what it was computed for, if known


def list_entries() -> list[CacheEntry]:
    """The cached reference tables, least recently used first."""
    directory = reference_dir()
    if not directory.is_dir():
        return []
    entries = []
    for table in directory.glob("*.safetensors"):
        sidecar = table.with_suffix(".json")
        try:
            st = table.stat()
            size = st.st_size + (sidecar.stat().st_size if sidecar.is_file() else 0)
        except FileNotFoundError:
            continue  # removed by another run meanwhile
        try:
            about = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            about = None
        entries.append(CacheEntry(table, size, st.st_mtime, about if isinstance(about, dict) else None))
    return sorted(entries, key=lambda e: (e.used, e.path.name))


def max_entries() -> int:
    """How many reference tables the cache keeps: $QDPO_REFERENCE_CACHE_ENTRIES, else 200."""
    raw = os.environ.get(MAX_ENTRIES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_ENTRIES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{MAX_ENTRIES_ENV} must be a whole number of at least 1; got {raw!r}.")
    return value


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot remove {path} from the cache ({e.strerror or e}).") from None


def evict(keep: Path | None = None, limit: int | None = None, limit_bytes: int = MAX_BYTES) -> list[Path]:
    """Remove the least recently used tables until at most `limit` (default max_entries()) and limit_bytes remain."""
    limit = max_entries() if limit is None else limit
    entries = list_entries()
    count, total = len(entries), sum(e.bytes for e in entries)
    removed = []
    for e in entries:
        if count <= limit and total <= limit_bytes:
            break
        if e.path == keep:
            continue
        _remove(e.path)
        _remove(e.path.with_suffix(".json"))
        count, total = count - 1, total - e.bytes
        removed.append(e.path)
    directory = reference_dir()
    if directory.is_dir():
        for sidecar in directory.glob("*.json"):  # a description whose table is gone
            if not sidecar.with_suffix(".safetensors").exists():
                _remove(sidecar)
        for leftover in directory.glob("*.tmp*"):  # from runs killed while writing
            try:
                if time.time() - leftover.stat().st_mtime > 3600:
                    leftover.unlink()
            except OSError:
                pass
    return removed


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def converted_models() -> list[tuple[Path, int]]:
    """The GGUF models converted into transformers checkpoints under <cache>/models, with their size."""
    directory = cache_root() / "models"
    if not directory.is_dir():
        return []
    return [(p, _tree_bytes(p)) for p in sorted(directory.iterdir())]


def clear_cache(models: bool = False) -> tuple[int, int, int]:
    """Remove every reference table (models=True: every converted GGUF model too); returns tables, models, bytes."""
    tables = list_entries()
    directory = reference_dir()
    removed_bytes = _tree_bytes(directory) if directory.is_dir() else 0
    if directory.is_dir():
        _remove(directory)
    converted = converted_models() if models else []
    for path, size in converted:
        _remove(path)
        removed_bytes += size
    return len(tables), len(converted), removed_bytes
