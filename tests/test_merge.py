"""qdpo merge on tiny models: exact against PEFT, exact against the 4-bit model it was trained on, and user errors."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qdpo.adapter import find_adapter
from qdpo.cli_ship import merge as merge_command
from qdpo.errors import UserError
from qdpo.merge import merge
from qdpo.model import ModelSource, load_base_4bit
from qdpo.nf4 import as_trained, model_layout
from qdpo.verify import CHECK_PROMPTS, check_prompts, compare, prompt_logits

CPU = torch.device("cpu")


def make_run(tmp_path_factory, model_dir: Path, name: str = "ship-run", *overrides: str) -> Path:
    """A real run directory from `qdpo run` (2 steps at lr 1e-2, so LoRA B is far from zero), made once per session."""
    out = tmp_path_factory.getbasetemp() / name
    if (out / "run.json").is_file():
        return out
    from qdpo.cli import main

    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus two?"}],
            "chosen": [{"role": "assistant", "content": f"{i} plus two is {i + 2}."}],
            "rejected": [{"role": "assistant", "content": "I am not sure about that, let me think."}],
        }
        for i in range(12)
    ]
    data = tmp_path_factory.getbasetemp() / "ship-data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--preset",
            "smoke",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--output",
            str(out),
            "--no-progress",
            "max_steps=2",
            "micro_batch_size=2",
            "gradient_accumulation_steps=1",
            "eval_fraction=0.25",
            "eval_steps=2",
            "learning_rate=1e-2",
            "loss_type=sigmoid",
            *overrides,
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def random_adapter(base_dir: Path, out: Path, seed: int = 0, **lora) -> Path:
    """A PEFT adapter with random A and B on the fp32 base (no training needed to make the merge visible)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **lora}
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return out


def peft_logits(base_dir: Path, adapter_dir: Path, prompts) -> list[torch.Tensor]:
    """The adapter on the full-precision base, as PEFT computes it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return prompt_logits(PeftModel.from_pretrained(base, adapter_dir).eval(), prompts)


def dir_logits(model_dir: Path, prompts) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return prompt_logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), prompts)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return make_run(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return check_prompts(tokenizer)


def test_original_merge_equals_peft_on_the_full_precision_base(run_dir, tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "merged"
    result = merge(
        run_dir, out, dtype="fp32", onto="original", check=False, echo=lambda _: None, max_shard_bytes=100_000
    )
    assert result.out == out and result.deviation is None

    reference = peft_logits(tiny_model_dir, run_dir / "adapter", prompts)
    deviation = compare(reference, dir_logits(out, prompts))
    assert deviation.max_abs <= 1e-4 * deviation.max_logit, deviation
    base_only = compare(reference, dir_logits(tiny_model_dir, prompts))
    assert base_only.max_abs > 0.1 * base_only.max_logit  # the adapter really changes the model

    # a plain transformers directory: shards + index, config without quantization, generation config, tokenizer
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shard_files) > 1 and sorted(set(index["weight_map"].values())) == shard_files
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (out / "generation_config.json").is_file()
    from transformers import AutoTokenizer

    assert (
        AutoTokenizer.from_pretrained(out).chat_template
        == AutoTokenizer.from_pretrained(run_dir / "adapter").chat_template
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    # --overwrite replaces an earlier merge; an adapter directory works as well as a run directory
    merge(run_dir / "adapter", out, dtype="bf16", overwrite=True, check=False, echo=lambda _: None)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_weights_are_the_4bit_models_own(tiny_model_dir, dtype):
    """quantize_4bit/dequantize_4bit here give bit-for-bit the weights of the model transformers loads in 4-bit."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    model = load_base_4bit(ModelSource("m", str(tiny_model_dir)), dtype, CPU, False)
    disk = load_file(tiny_model_dir / "model.safetensors")
    quantized, tied = model_layout(tiny_model_dir)
    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(layers) == quantized and len(quantized) == 14 and tied == {}
    for name, layer in layers.items():
        held = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(as_trained(disk[name], True, dtype), held), name
    for name, param in model.named_parameters():
        if f"{name}" not in layers:
            assert torch.equal(as_trained(disk[name], False, dtype), param.data), name


def test_dequantized_merge_is_the_trained_function_and_original_shows_quantization_error(
    run_dir, tiny_model_dir, prompts, tmp_path
):
    lines: list[str] = []
    exact = merge(run_dir, tmp_path / "dequantized", onto="dequantized", echo=lines.append)
    approx = merge(run_dir, tmp_path / "original", onto="original", echo=lines.append)
    assert exact.deviation.max_abs <= 1e-5 * exact.deviation.max_logit and exact.deviation.top1_agreement == 1
    assert approx.deviation.max_abs > 1000 * exact.deviation.max_abs

    # the reported number is the one a user measures by hand: adapter on the 4-bit base vs the merged directory
    from peft import PeftModel

    trained = PeftModel.from_pretrained(
        load_base_4bit(ModelSource("m", str(tiny_model_dir)), torch.float32, CPU, False), str(run_dir / "adapter")
    )
    reference = prompt_logits(trained.eval(), prompts)
    for result in (exact, approx):
        by_hand = compare(reference, dir_logits(result.out, prompts))
        assert by_hand.max_abs == pytest.approx(result.deviation.max_abs, rel=1e-3, abs=1e-6)
        assert any(result.deviation.describe() in line for line in lines)
    assert len(prompts) == len(CHECK_PROMPTS)

    # held-out reward accuracy: the trained model's, rebuilt from config.yaml, is the one the run logged at its end
    summary = json.loads((run_dir / "summary.json").read_text())
    for result in (exact, approx):
        assert result.shipped.pairs == summary["eval_pairs"] == 3
        assert result.shipped.trained_accuracy == pytest.approx(summary["eval_rewards/accuracies"])
        assert result.shipped.describe() in lines
    assert exact.shipped.accuracy == exact.shipped.trained_accuracy  # the same function scores the same


def test_accuracy_of_a_reference_free_run_is_measured_as_the_run_measured_it(tmp_path_factory, tiny_model_dir):
    """SimPO compares no reference: the check scores the held-out pairs without one, as the run's evaluation did."""
    run_dir = make_run(tmp_path_factory, tiny_model_dir, "simpo-run", "loss_type=simpo", "beta=2.0")
    lines: list[str] = []
    result = merge(run_dir, tmp_path_factory.mktemp("simpo") / "merged", echo=lines.append)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result.shipped.trained_accuracy == pytest.approx(summary["eval_rewards/accuracies"])
    assert result.shipped.accuracy == result.shipped.trained_accuracy and result.shipped.pairs == 3


def test_an_adapter_outside_a_run_is_checked_without_accuracies(tiny_model_dir, tmp_path):
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    lines: list[str] = []
    result = merge(adapter, tmp_path / "merged", echo=lines.append)
    assert result.shipped.accuracy is None and result.deviation.top1_agreement == 1
    assert f"held-out accuracy not measured: {adapter} is not inside a qdpo run directory" in "\n".join(lines)
    lines.clear()
    merge(adapter, tmp_path / "merged", overwrite=True, eval_pairs=0, echo=lines.append)
    assert not any("held-out" in line for line in lines)  # --eval-pairs 0: not asked for, nothing said


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose lm_head shares the embedding matrix (like SmolLM2)."""
    from conftest import make_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("tied-llama")
    make_tokenizer(path)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "lora, untied",
    [
        ({"target_modules": ["q_proj", "v_proj"], "use_rslora": True}, False),
        ({"target_modules": ["lm_head", "down_proj"]}, True),
        ({"target_modules": ["embed_tokens", "o_proj"], "alpha_pattern": {"o_proj": 2}}, True),
    ],
)
def test_tied_embeddings_rslora_and_alpha_pattern_match_peft(tied_model_dir, prompts, tmp_path, lora, untied):
    adapter = random_adapter(tied_model_dir, tmp_path / "adapter", **lora)
    out = tmp_path / "merged"
    merge(adapter, out, onto="original", check=False, echo=lambda _: None)
    deviation = compare(peft_logits(tied_model_dir, adapter, prompts), dir_logits(out, prompts))
    assert deviation.max_abs <= 1e-4 * deviation.max_logit, deviation
    weights = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    # no LoRA on either use of the shared matrix: it stays shared; LoRA on one use: each gets its own copy
    assert ("lm_head.weight" in weights) == untied
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == (not untied)


def test_not_a_run_directory_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = CliRunner().invoke(merge_command, [str(tmp_path), "--out", str(tmp_path / "m")])
    assert isinstance(result.exception, UserError)
    assert "neither a qdpo run directory" in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "m").exists()


def test_base_with_other_shapes_is_refused(run_dir, tmp_path):
    from conftest import make_model, make_tokenizer
    from transformers import AutoConfig

    other = tmp_path / "other"
    other.mkdir()
    make_tokenizer(other)
    make_model(other)
    config = AutoConfig.from_pretrained(other)
    config.intermediate_size = 96  # same names, other shapes
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    result = CliRunner().invoke(merge_command, [str(run_dir), "--out", str(tmp_path / "m"), "--base", str(other)])
    assert isinstance(result.exception, UserError), result.output
    assert "does not fit base model" in str(result.exception) and "mlp" in str(result.exception)
    assert not (tmp_path / "m").exists()


def test_existing_output_needs_overwrite_and_must_be_a_model(run_dir, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(merge_command, [str(run_dir), "--out", str(out)])
    assert isinstance(result.exception, UserError) and "already exists" in str(result.exception)
    result = CliRunner().invoke(merge_command, [str(run_dir), "--out", str(out), "--overwrite"])
    assert isinstance(result.exception, UserError) and "refusing to overwrite" in str(result.exception)
    assert (out / "mine.txt").read_text() == "keep me"


def test_full_disk_part_way_leaves_nothing(run_dir, tmp_path, monkeypatch):
    import qdpo.safetensors_io

    real_write = qdpo.safetensors_io.write_tensor
    written = []

    def fill_up(f, tensor):
        if len(written) == 5:  # a few tensors in, the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(tensor)
        real_write(f, tensor)

    monkeypatch.setattr(qdpo.safetensors_io, "write_tensor", fill_up)
    result = CliRunner().invoke(merge_command, [str(run_dir), "--out", str(tmp_path / "m"), "--no-check"])
    assert isinstance(result.exception, UserError), result.output
    assert "No space left on device" in str(result.exception) and "\n" not in str(result.exception)
    assert len(written) == 5 and list(tmp_path.iterdir()) == []  # no final dir, no temp dir


def test_merge_help():
    result = CliRunner().invoke(merge_command, ["--help"])
    assert (
        result.exit_code == 0
        and "--onto [dequantized|original]" in result.output
        and "--eval-pairs" in result.output
        and "RUN_DIR|ADAPTER_DIR" in result.output
    )


def test_find_adapter_reads_the_run(run_dir):
    adapter = find_adapter(run_dir)
    assert adapter.path == run_dir / "adapter" and adapter.run_dir == run_dir
    assert adapter.run["quantization"]["compute_dtype"] == "float32"


def test_a_run_from_gguf_merges_onto_its_converted_checkpoint(run_dir, tiny_model_dir, tmp_path, monkeypatch):
    """run.json names the GGUF file; if the converted checkpoint left the cache, merge converts the same file again."""
    from qdpo.export import write_gguf

    gguf = tmp_path / "tiny.gguf"
    write_gguf(tiny_model_dir, gguf, "f16", name="tiny")
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    described = json.loads((adapter / "qdpo.json").read_text())
    described["base_model"] = {"name": str(gguf), "path": str(tmp_path / "gone"), "gguf_file": str(gguf)}
    (adapter / "qdpo.json").write_text(json.dumps(described))
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))

    result = merge(adapter, tmp_path / "merged", check=False, echo=lambda _: None)
    converted = json.loads((result.out / "qdpo_merge.json").read_text())["base_dir"]
    assert Path(converted).parent == tmp_path / "cache" / "models" and result.base.gguf_file == str(gguf)


def test_smollm2_dequantized_merge_is_the_trained_function(smollm2_dir, tmp_path):
    """The real embedded default (tied embeddings, converted from GGUF): float noise against the adapter on NF4."""
    adapter = random_adapter(smollm2_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    lines: list[str] = []
    result = merge(adapter, tmp_path / "merged", onto="dequantized", echo=lines.append)
    assert result.deviation.max_abs <= 1e-4 * result.deviation.max_logit, result.deviation
    assert result.deviation.top1_agreement == 1
    assert json.loads((result.out / "config.json").read_text())["tie_word_embeddings"] is True
