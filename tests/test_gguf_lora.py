"""qdpo export --format gguf-lora and the Ollama Modelfiles: the LoRA file's tensors against the adapter's own
factors (read straight from adapter_model.safetensors), and the Modelfile lines against rendered chat templates."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_merge import make_run, random_adapter

from qdpo.cli_ship import export as export_command
from qdpo.errors import UserError
from qdpo.gguf_lora import export_gguf_lora
from qdpo.ollama import CHATML_TEMPLATE, chatml_system, template_lines

# llama.cpp's names for the Llama blocks' linear layers (src/llama-arch.cpp), written out here, not looked up.
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return make_run(tmp_path_factory, tiny_model_dir)


def peft_factors(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{GGUF base tensor name: {"A": ..., "B": ...}} from the adapter's safetensors, named by hand."""
    from safetensors.torch import load_file

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        layer, module, part = KEY.fullmatch(key).groups()
        factors.setdefault(f"blk.{layer}.{GGUF_NAMES[module]}.weight", {})[part] = tensor.float()
    return factors


def unpermute(rows: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's Q/K row order back to Hugging Face's, as transformers' GGUF loader undoes it."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor()._reverse_permute_weights(rows, n_head, n_kv)


def read_lora_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return tensors, fields


def test_gguf_lora_holds_the_adapter_factors_in_llama_cpp_layout(run_dir, tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "adapter.gguf"
    lines: list[str] = []
    export_gguf_lora(run_dir, out, echo=lines.append)
    tensors, fields = read_lora_file(out)
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == pytest.approx(alpha)

    config = AutoConfig.from_pretrained(tiny_model_dir)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    factors = peft_factors(run_dir / "adapter")
    assert set(tensors) == {f"{name}.lora_{p}" for name in factors for p in "ab"} and len(factors) == 14
    for name, f in factors.items():
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        assert a.shape == tuple(f["A"].shape) and b.shape == tuple(f["B"].shape)  # (r, in) and (out, r)
        np.testing.assert_allclose(a, f["A"].numpy(), rtol=1e-3, atol=1e-4)  # f16
        # llama.cpp adds alpha / r · B·A; with Q/K rows put back in Hugging Face's order, that is PEFT's change.
        delta = alpha / r * (b @ a)
        if ".attn_q." in name or ".attn_k." in name:
            delta = unpermute(delta, heads, heads if ".attn_q." in name else kv)
        else:
            np.testing.assert_allclose(b, f["B"].numpy(), rtol=1e-3, atol=1e-4)
        expected = (alpha / r * (f["B"] @ f["A"])).numpy()
        np.testing.assert_allclose(delta, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    # the permutation really moved rows (kv heads != heads here), so the un-permuting above was tested
    q = tensors["blk.0.attn_k.weight.lora_b"]
    assert not np.allclose(q, factors["blk.0.attn_k.weight"]["B"].numpy(), atol=1e-3)

    modelfile = (tmp_path / "adapter.Modelfile").read_text().splitlines()
    assert "ADAPTER ./adapter.gguf" in modelfile
    assert any(line.startswith("# ") and "convert_hf_to_gguf.py" in line for line in modelfile)  # base is no GGUF
    assert f"FROM {tiny_model_dir}" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert any("apply it to the base GGUF with llama.cpp's --lora" in line for line in lines)


def test_gguf_lora_folds_per_module_alpha_into_b(tiny_model_dir, tmp_path):
    """alpha_pattern gives v_proj another scale; llama.cpp has one alpha, so B carries the ratio."""
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter", alpha_pattern={"v_proj": 2})
    out = tmp_path / "lora.gguf"
    export_gguf_lora(adapter, out, qtype="f16", echo=lambda _: None)
    tensors, fields = read_lora_file(out)
    factors = peft_factors(adapter)
    alpha, r = fields["adapter.lora.alpha"], tensors["blk.0.attn_v.weight.lora_a"].shape[0]
    assert alpha == pytest.approx(8)  # lora_alpha of the q_proj/k_proj/... pairs, the first in name order
    for name in ("blk.1.attn_v.weight", "blk.1.ffn_up.weight"):
        f = factors[name]
        scale = (2 if "attn_v" in name else 8) / 4  # PEFT's alpha / r for this module
        got = alpha / r * (tensors[f"{name}.lora_b"] @ tensors[f"{name}.lora_a"])
        np.testing.assert_allclose(got, (scale * f["B"] @ f["A"]).numpy(), rtol=2e-3, atol=1e-3)


def test_overwrite_replaces_an_earlier_gguf_but_no_other_file(tiny_model_dir, tmp_path):
    """--overwrite is for re-exporting: an earlier GGUF file (or an empty one) is replaced, a file that is not GGUF
    (a typo'd --out naming the user's notes) is refused in one line and left as it was."""
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(UserError, match="is not a GGUF file; refusing to overwrite it"):
        export_gguf_lora(adapter, notes, overwrite=True, echo=lambda _: None)
    assert notes.read_text() == "my notes"
    out = tmp_path / "lora.gguf"
    out.touch()
    for _ in range(2):  # an empty file, then the first export's own output
        export_gguf_lora(adapter, out, overwrite=True, echo=lambda _: None)
        assert out.read_bytes()[:4] == b"GGUF"


def test_gguf_lora_from_a_gguf_base_names_that_file_in_the_modelfile(run_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    described = json.loads((adapter / "qdpo.json").read_text())
    base_gguf = tmp_path / "base.gguf"
    base_gguf.write_bytes(b"GGUF")  # only its path matters to the Modelfile
    described["base_model"]["gguf_file"] = str(base_gguf)
    (adapter / "qdpo.json").write_text(json.dumps(described))
    result = CliRunner().invoke(
        export_command, [str(adapter), "--format", "gguf-lora", "--out", str(tmp_path / "x.gguf"), "--type", "q8_0"]
    )
    assert result.exit_code == 0, result.output
    modelfile = (tmp_path / "x.Modelfile").read_text().splitlines()
    assert f"FROM {base_gguf}" in modelfile and "ADAPTER ./x.gguf" in modelfile
    assert not any("convert_hf_to_gguf" in line for line in modelfile)


def test_gguf_lora_refuses_a_lora_on_either_side_of_tied_embeddings(tmp_path):
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdpo.errors import UserError

    base = tmp_path / "tied"
    make_tokenizer(base)
    config = LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(base)
    adapter = random_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    with pytest.raises(UserError, match="ties to its embeddings"):
        export_gguf_lora(adapter, tmp_path / "a.gguf", echo=lambda _: None)
    assert not (tmp_path / "a.gguf").exists()
    # the embedding side of the tie: llama.cpp names the tied output layer token_embd.weight too
    adapter = random_adapter(base, tmp_path / "embed", target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(UserError, match="changes embed_tokens, which this model ties to lm_head"):
        export_gguf_lora(adapter, tmp_path / "a.gguf", echo=lambda _: None)
    assert not (tmp_path / "a.gguf").exists()


CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    "template, system",
    [
        (CHATML, "You are a helpful assistant."),  # Qwen2 / SmolLM2 style: a default system turn
        (CHATML.split("{% endif %}", 1)[1], None),  # plain ChatML
    ],
)
def test_a_chatml_template_becomes_ollamas_go_template(tokenizer, template, system):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    tokenizer.eos_token = "<|im_end|>"
    assert chatml_system(tokenizer) == (True, system)
    lines = template_lines(tokenizer)
    assert f'TEMPLATE """{CHATML_TEMPLATE}"""' in "\n".join(lines)
    assert (f'SYSTEM """{system}"""' in lines) == (system is not None)
    assert lines[-2:] == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']


def test_other_templates_are_left_to_the_gguf(tokenizer):
    assert chatml_system(tokenizer) == (False, None)  # the test template: <|user|> turns ending in EOS
    almost = copy.deepcopy(tokenizer)
    almost.chat_template = CHATML.replace("<|im_end|>\n{% endfor %}", "<|im_end|>{% endfor %}")  # no newline
    assert chatml_system(almost) == (False, None)
    lines = template_lines(tokenizer)
    assert not any(line.startswith(("TEMPLATE", "SYSTEM")) for line in lines)
    assert any("Ollama takes the" in line for line in lines)
    assert lines[-1] == f'PARAMETER stop "{tokenizer.eos_token}"'
