"""The reference cache: its key changes whenever the numbers could, it stays bounded, and `qdpo cache` manages it."""

import json
import os
import shutil
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import qdpo.reference as ref
from qdpo.cli import main
from qdpo.errors import UserError
from qdpo.model import ModelSource
from qdpo.reference import cache_key, evict, hub_revision, library_versions, list_entries, load_or_compute
from qdpo.tokenize import TokenizedPair

PAIRS = [TokenizedPair([1, 2, 3], [4, 5], [6]), TokenizedPair([1, 7], [8], [9, 10])]
BATCHES = [[0, 1]]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ref.MAX_ENTRIES_ENV, raising=False)
    return tmp_path / "cache"


def write_weights(path, seed: int) -> None:
    save_file({"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(seed))}, str(path))


def make_model(path, seed: int = 0):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    write_weights(path / "model.safetensors", seed)
    return path


def make_adapter(path, seed: int = 0):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    write_weights(path / "adapter_model.safetensors", seed)
    return path


def key_of(model_dir, init_adapter=None, **kwargs):
    source = ModelSource(str(model_dir), str(model_dir))
    return cache_key(source, init_adapter, PAIRS, torch.float32, 2, BATCHES, **kwargs)


def rewrite_keeping_size_and_mtime(path, seed: int) -> None:
    before = path.stat()
    write_weights(path, seed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_same_inputs_give_the_same_key(tmp_path):
    model = make_model(tmp_path / "m")
    assert key_of(model) == key_of(model)
    assert len(key_of(model)) == 24


def test_home_relative_adapters_are_expanded(tmp_path, monkeypatch):
    home = tmp_path / "home"
    model = make_model(tmp_path / "m")
    make_adapter(home / "a")
    make_adapter(home / "b")  # the same bytes: only the path tells them apart
    monkeypatch.setenv("HOME", str(home))
    assert key_of(model, "~/a") != key_of(model, "~/b")
    assert key_of(model, "~/a") == key_of(model, str(home / "a"))


def test_the_model_path_is_in_the_key(tmp_path):
    model = make_model(tmp_path / "m")
    copy = tmp_path / "elsewhere" / "m"
    shutil.copytree(model, copy, copy_function=shutil.copy2)  # same names, sizes, mtimes and bytes
    assert key_of(model) != key_of(copy)
    assert key_of(model) == key_of(tmp_path / "elsewhere" / ".." / "m")  # resolved: one directory, one key


def test_the_adapter_path_is_in_the_key(tmp_path):
    model = make_model(tmp_path / "m")
    adapter = make_adapter(tmp_path / "a")
    shutil.copytree(adapter, tmp_path / "b", copy_function=shutil.copy2)
    assert key_of(model, str(adapter)) != key_of(model, str(tmp_path / "b"))


def test_model_weights_rewritten_with_same_size_and_mtime_change_the_key(tmp_path):
    model = make_model(tmp_path / "m")
    before = key_of(model)
    rewrite_keeping_size_and_mtime(model / "model.safetensors", seed=1)
    assert key_of(model) != before


def test_adapter_weights_and_config_rewritten_change_the_key(tmp_path):
    model = make_model(tmp_path / "m")
    adapter = make_adapter(tmp_path / "a")
    first = key_of(model, str(adapter))
    rewrite_keeping_size_and_mtime(adapter / "adapter_model.safetensors", seed=1)
    second = key_of(model, str(adapter))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 32}))
    assert len({first, second, key_of(model, str(adapter))}) == 3


def test_remembered_hashes_do_not_survive_a_rewrite_that_keeps_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(ref, "MEMO_MIN_BYTES", 0)  # remember every file's hash...
    monkeypatch.setattr(ref, "RACY_SECONDS", -1.0)  # ...even one written just now
    model = make_model(tmp_path / "m")
    first = key_of(model)
    hashed = []
    real = ref._hash_file
    monkeypatch.setattr(ref, "_hash_file", lambda p: hashed.append(p.name) or real(p))
    assert key_of(model) == first and hashed == []  # remembered: nothing read again
    time.sleep(0.05)  # past the file system's timestamp tick, so the rewrite gets a new ctime
    rewrite_keeping_size_and_mtime(model / "model.safetensors", seed=1)
    assert key_of(model) != first and hashed == ["model.safetensors"]


def test_files_written_just_now_are_not_remembered(tmp_path, monkeypatch):
    monkeypatch.setattr(ref, "MEMO_MIN_BYTES", 0)
    key_of(make_model(tmp_path / "m"))
    memo = ref.reference_dir() / ".file-hashes.json"
    assert not memo.exists() or json.loads(memo.read_text()) == {}


def test_library_versions_are_in_the_key(tmp_path, monkeypatch):
    model = make_model(tmp_path / "m")
    assert library_versions()["torch"] == torch.__version__
    assert set(library_versions()) == {"torch", "transformers", "bitsandbytes", "peft", "qdpo"}
    before = key_of(model)
    real = ref._version
    monkeypatch.setattr(ref, "_version", lambda name: "0.51.0" if name == "bitsandbytes" else real(name))
    assert key_of(model) != before


def test_settings_that_decide_the_numbers_are_in_the_key(tmp_path, monkeypatch):
    model = make_model(tmp_path / "m")
    base = key_of(model)
    assert key_of(model, extra={"lora_dropout": 0.1}) != key_of(model, extra={"lora_dropout": 0.0})
    assert key_of(model, extra={"lora_dropout": 0.0}) != base
    assert base.about["inputs"]["bnb_cpu_repack"] == "off"
    assert base.about["inputs"]["quantization"] == {
        "type": "nf4",
        "double_quant": True,
        "compute_dtype": "torch.float32",
    }
    on_cpu = key_of(model, device=torch.device("cpu"))
    assert on_cpu != base
    other = "AVX2" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "AVX512"  # whatever this CPU has
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    assert key_of(model, device="cpu") != on_cpu  # other CPU kernels: other rounding


def fake_hub(root, repo: str, commit: str):
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")


def test_hub_models_are_keyed_by_the_cached_commit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "org/name" is no local directory here
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    source = ModelSource("org/name", "org/name")
    unknown = cache_key(source, None, PAIRS, torch.float32, 2, BATCHES)
    assert unknown.about["inputs"]["model"]["revision"].startswith("unknown")
    fake_hub(hub, "org/name", "a" * 40)
    assert hub_revision("org/name") == "a" * 40
    first = cache_key(source, None, PAIRS, torch.float32, 2, BATCHES)
    fake_hub(hub, "org/name", "b" * 40)  # the hub moved on and the cache followed
    second = cache_key(source, None, PAIRS, torch.float32, 2, BATCHES)
    assert len({unknown, first, second}) == 3
    assert second.about["inputs"]["model"] == {"hub": "org/name", "revision": "b" * 40}


def fill(count: int, monkeypatch, model_dir) -> list[str]:
    """count cache entries, oldest first, each one second older than the next."""
    monkeypatch.setattr(ref, "compute_reference", lambda *a, **k: torch.zeros(len(PAIRS), 2))
    keys = []
    for i in range(count):
        key = key_of(model_dir, extra={"i": i})
        _, scored = load_or_compute(None, PAIRS, BATCHES, 0, key)
        assert scored == len(BATCHES)
        keys.append(key)
    now = time.time()
    for i, key in enumerate(keys):
        os.utime(ref.reference_dir() / f"{key}.safetensors", (now - 100 + i, now - 100 + i))
    return keys


def names(entries) -> list[str]:
    return [e.path.stem for e in entries]


def test_writing_an_entry_evicts_the_least_recently_used_beyond_the_limit(tmp_path, monkeypatch):
    model = make_model(tmp_path / "m")
    keys = fill(5, monkeypatch, model)
    assert names(list_entries()) == keys
    _, scored = load_or_compute(None, PAIRS, BATCHES, 0, keys[0])  # a hit: the oldest becomes the newest
    assert scored == 0
    time.sleep(0.05)  # file times tick in jiffies (4-10 ms): the next write must not tie with the hit's
    monkeypatch.setenv(ref.MAX_ENTRIES_ENV, "3")
    new = key_of(model, extra={"i": "new"})
    load_or_compute(None, PAIRS, BATCHES, 0, new)
    assert names(list_entries()) == [keys[4], keys[0], new]  # keys 1..3 were the least recently used
    left = sorted(p.name for p in ref.reference_dir().iterdir())
    assert left == sorted(f"{k}.{ext}" for k in (keys[4], keys[0], new) for ext in ("json", "safetensors"))


def test_eviction_keeps_the_cache_under_its_byte_bound(tmp_path, monkeypatch):
    keys = fill(4, monkeypatch, make_model(tmp_path / "m"))
    sizes = [e.bytes for e in list_entries()]
    removed = evict(limit=100, limit_bytes=sizes[-1] + sizes[-2])
    assert [p.stem for p in removed] == keys[:2]
    assert names(list_entries()) == keys[2:]
    assert sum(e.bytes for e in list_entries()) <= sizes[-1] + sizes[-2]


def test_a_bad_entry_limit_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(ref.MAX_ENTRIES_ENV, "lots")
    with pytest.raises(UserError, match="QDPO_REFERENCE_CACHE_ENTRIES must be a whole number"):
        ref.max_entries()
    result = CliRunner().invoke(main, ["cache", "list"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: QDPO_REFERENCE_CACHE_ENTRIES must be a whole number of at least 1; got 'lots'."
    ]


@pytest.mark.parametrize("args", [["cache", "--help"], ["cache", "list", "--help"], ["cache", "clear", "--help"]])
def test_cache_help(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "Usage:" in result.output


def test_cache_list_and_clear(tmp_path, monkeypatch, cache):
    runner = CliRunner()
    assert "no reference tables" in runner.invoke(main, ["cache", "list"]).output
    keys = fill(2, monkeypatch, make_model(tmp_path / "m"))
    converted = cache / "models" / "tiny-0123"
    converted.mkdir(parents=True)
    (converted / "model.safetensors").write_bytes(b"x" * 2000)
    result = runner.invoke(main, ["cache", "list"])
    assert result.exit_code == 0, result.output
    rows = result.output.splitlines()
    assert rows[0].startswith("2 reference tables")
    for key in keys:  # newest first, each with its size, age and what it was for
        line = rows[1 + keys[::-1].index(key)]
        assert f"{key}.safetensors" in line and "min ago" in line and f"{tmp_path / 'm'}, 2 pairs (data " in line
    assert any("tiny-0123  2.0 KB" in row for row in rows)
    result = runner.invoke(main, ["cache", "clear"])
    assert result.exit_code == 0 and result.output.startswith("removed 2 reference tables")
    assert list_entries() == [] and converted.is_dir()  # converted models stay without --all
    result = runner.invoke(main, ["cache", "clear", "--all"])
    assert result.exit_code == 0 and "and 1 converted GGUF model (" in result.output
    assert not converted.exists()


def test_cache_list_counts_the_pairs_a_table_holds(tmp_path, monkeypatch, cache):
    """A short run scores only the micro-batches it uses: the listing says how many of the split's pairs it holds."""
    key = key_of(make_model(tmp_path / "m"))
    ref.store_table(torch.tensor([[-1.0, -2.0], [float("nan"), float("nan")]]), key)
    line = CliRunner().invoke(main, ["cache", "list"]).output.splitlines()[1]
    assert f"{tmp_path / 'm'}, 1 of 2 pairs (data " in line, line
