"""Tokenization follows the DPO convention: one BOS, one EOS, prompts cut left, responses cut right."""

import copy

import pytest

from qdpo.data import Pair, unify
from qdpo.tokenize import encode_pair, encode_prompt, tokenize_pairs

MSG = [{"role": "user", "content": "What is two plus two?"}]


def encode_response(tokenizer, prompt, response) -> list[int]:
    """One response's ids, as tokenize_pairs gives them (with the same text as the rival)."""
    return encode_pair(tokenizer, prompt, response, response)[1]


def test_chat_prompt_has_one_bos_and_the_generation_prompt(tokenizer):
    ids = encode_prompt(tokenizer, MSG)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids).endswith("<|assistant|>\n")


def test_plain_prompt_gets_the_tokenizers_bos_once(tokenizer):
    ids = encode_prompt(tokenizer, "What is two plus two?")
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    # a prompt text that already starts with BOS is not given a second one
    assert encode_prompt(tokenizer, "<s>What is two plus two?") == ids


def test_chat_response_ends_with_exactly_one_eos(tokenizer):
    """The template closes the turn with EOS + newline: the response ends at that EOS, nothing appended."""
    ids = encode_response(tokenizer, MSG, [{"role": "assistant", "content": "Two plus two is four."}])
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids[:-1]) == "Two plus two is four."
    assert tokenizer.bos_token_id not in ids


def test_plain_response_gets_eos_appended_and_no_bos(tokenizer):
    ids = encode_response(tokenizer, "What is two plus two?", "Four.")
    assert ids == tokenizer("Four.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_prompt_plus_response_equals_template_of_whole_chat(tokenizer):
    """Concatenated ids decode to the chat template of the whole conversation, minus its trailing newline."""
    answer = [{"role": "assistant", "content": "Two plus two is four."}]
    ids = encode_prompt(tokenizer, MSG) + encode_response(tokenizer, MSG, answer)
    whole = tokenizer.apply_chat_template(MSG + answer, tokenize=False)
    assert tokenizer.decode(ids) == whole.rstrip("\n")


def test_truncation_and_drop_counts(tokenizer):
    long_prompt = "Hello there, how are you today? " * 10
    pairs = [
        Pair(long_prompt, "I am fine, thank you.", "I am not sure."),  # prompt cut from the left
        Pair("Hi", "I am fine, thank you. " * 10, "I am not sure. " * 10),  # responses cut from the right
        Pair("Hi", "   ", "No."),  # empty response: dropped
        Pair("Hi", "Same.", "Same."),  # identical: dropped
        Pair("Hi", "Same words here " * 10 + "yes", "Same words here " * 10 + "no"),  # differ only past max_length
    ]
    kept, stats = tokenize_pairs(tokenizer, pairs, max_length=24, max_prompt_length=8)
    assert (stats.dropped_empty, stats.dropped_identical, stats.dropped_too_long) == (1, 1, 1)
    assert stats.prompts_truncated == 1 and stats.responses_truncated == 2 and stats.kept == 2
    # counted per response, on kept pairs only: one cut answer is 1; a dropped pair's cuts are not counted
    _, stats = tokenize_pairs(tokenizer, [pairs[0], Pair("Hi", "I am fine. " * 10, "No.")], 24, 8)
    assert stats.responses_truncated == 1 and stats.prompts_truncated == 1
    _, stats = tokenize_pairs(
        tokenizer, [Pair("Hello there, how are you today? " * 10, pairs[4].chosen, pairs[4].rejected)], 24, 8
    )
    assert stats.dropped_too_long == 1 and (stats.prompts_truncated, stats.responses_truncated) == (0, 0)
    first, second = kept
    full_prompt = encode_prompt(tokenizer, long_prompt)
    assert first.prompt_ids == full_prompt[-8:]  # the end of the prompt is kept
    assert len(second.prompt_ids) + len(second.chosen_ids) == 24
    assert (
        second.chosen_ids
        == encode_response(tokenizer, "Hi", "I am fine, thank you. " * 10)[: 24 - len(second.prompt_ids)]
    )
    assert all(len(p) <= 24 for p in kept)


def test_empty_prompt_without_bos_is_dropped(tiny_model_dir):
    """With no BOS, an empty prompt leaves no position to predict the first response token from: dropped, and
    counted. With a BOS the prompt is [BOS] and the pair is kept."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    with_bos = AutoTokenizer.from_pretrained(tiny_model_dir)
    no_bos = AutoTokenizer.from_pretrained(tiny_model_dir)
    no_bos.backend_tokenizer.post_processor = processors.Sequence([])
    assert no_bos("")["input_ids"] == [] and with_bos("")["input_ids"] == [with_bos.bos_token_id]
    pairs = [Pair("", "Yes.", "No."), Pair("Hi", "Yes.", "No.")]
    kept, stats = tokenize_pairs(no_bos, pairs, max_length=24, max_prompt_length=8)
    assert stats.kept == 1 and stats.dropped_empty == 1 and kept[0].prompt_ids
    kept, stats = tokenize_pairs(with_bos, pairs, max_length=24, max_prompt_length=8)
    assert stats.kept == 2 and kept[0].prompt_ids == [with_bos.bos_token_id]


def test_doubled_bos_and_eos_are_cut_to_one_and_reported(tokenizer):
    """The text writes BOS/EOS itself and the tokenizer or template adds another: one is kept, and the run says so."""
    from qdpo.data import Columns, to_pairs
    from qdpo.tokenize import tokenize_pairs

    rows = [
        {"prompt": "<s>What is two plus two?", "chosen": "Four.", "rejected": "Five."},
        {
            "prompt": [{"role": "user", "content": "What is two plus two?"}],
            "chosen": [{"role": "assistant", "content": "Four.</s>"}],
            "rejected": [{"role": "assistant", "content": "Five."}],
        },
    ]
    pairs, stats = tokenize_pairs(tokenizer, to_pairs(rows, Columns(), "t"), 128, 64)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for p in pairs:
        assert p.prompt_ids[0] == bos and p.prompt_ids[1] != bos
        for ids in (p.chosen_ids, p.rejected_ids):
            assert ids[-1] == eos and ids[-2] != eos and ids.count(eos) == 1
    assert stats.notes == [
        "1 prompts started with two BOS tokens (the text or chat template writes "
        "one and the tokenizer adds one); qdpo kept one",
        "1 responses ended with two EOS tokens (the text ends with '</s>' and the "
        "turn is closed again); qdpo kept one",
    ]


def test_each_pair_records_what_truncation_cut_and_the_preview_marks_it(tokenizer):
    from types import SimpleNamespace

    from qdpo.prepare import preview

    long_prompt = "Hello there, how are you today? " * 10
    long_chosen, short_rejected = "I am fine, thank you. " * 10, "I am not sure."
    kept, _ = tokenize_pairs(tokenizer, [Pair(long_prompt, long_chosen, short_rejected)], 24, 8)
    full = encode_prompt(tokenizer, long_prompt), encode_response(tokenizer, long_prompt, long_chosen)
    (pair,) = kept
    budget = 24 - 8
    assert pair.cut == (len(full[0]) - 8, len(full[1]) - budget, 0)
    shown = preview(SimpleNamespace(tokenizer=tokenizer, train=kept), 3)
    assert len(shown) == 1
    assert shown[0]["prompt"].startswith(f"[... {len(full[0]) - 8} tokens cut] ")
    assert shown[0]["chosen"].endswith(f" [... {len(full[1]) - budget} tokens cut]")
    assert "cut" not in shown[0]["rejected"] and shown[0]["rejected"].startswith("I am not sure.")


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """Llama-2/Mistral-style: a SentencePiece-like tokenizer that writes a space ("▁") before the text it encodes."""
    from conftest import make_sentencepiece_style_tokenizer

    return make_sentencepiece_style_tokenizer(tmp_path_factory.mktemp("sp"))


def test_responses_are_the_tokens_that_follow_the_prompt_in_the_whole_encoding(sp_tokenizer):
    """Encoded alone, a SentencePiece-style response would start with "▁", a token the whole text never has: the
    ids are those of the whole sequence, chat (the template's text of the whole conversation, less what follows
    its EOS) and plain text (prompt + response, then EOS)."""
    tok = sp_tokenizer
    answer = [{"role": "assistant", "content": "Two plus two is four."}]
    alone = tok("Two plus two is four.", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone[0]).startswith("▁")  # the trap
    whole = tok(tok.apply_chat_template(MSG + answer, tokenize=False).rstrip("\n"), add_special_tokens=False)
    response = encode_response(tok, MSG, answer)
    assert encode_prompt(tok, MSG) + response == whole["input_ids"]
    assert not tok.convert_ids_to_tokens(response[0]).startswith("▁")
    for prompt, text in (("Question: what is two plus two?\nAnswer:", " Four."), ("Say it:\n", "Four.")):
        assert encode_prompt(tok, prompt) + encode_response(tok, prompt, text) == tok(prompt + text)["input_ids"] + [
            tok.eos_token_id
        ]


def test_a_prompt_that_merges_with_its_responses_keeps_the_shared_ids(sp_tokenizer):
    """A prompt that ends with a space: the whole encoding joins that space to the next word, so the prompt's own
    ids are not its start. The prompt keeps the ids both sequences share, and the joined token starts the
    responses: each sequence is still the tokenizer's encoding of prompt + response, and the run says how often."""
    tok = sp_tokenizer
    pairs = [Pair("Say it: ", "two.", "four."), Pair("Say it:", " two.", " four.")]
    assert tok.convert_ids_to_tokens(tok("Say it: two.")["input_ids"])[-2:] == ["▁two", "."]  # the space joins "two"
    kept, stats = tokenize_pairs(tok, pairs, 64, 32)
    assert stats.kept == 2
    for pair in kept:
        assert pair.prompt_ids == tok("Say it:")["input_ids"]
        assert pair.prompt_ids + pair.chosen_ids == tok("Say it: two.")["input_ids"] + [tok.eos_token_id]
        assert pair.prompt_ids + pair.rejected_ids == tok("Say it: four.")["input_ids"] + [tok.eos_token_id]
    assert stats.notes == [
        "1 prompts end in characters the tokenizer joins with the response's first (e.g. a trailing space); "
        "their last tokens are scored as the start of the responses"
    ]


MISTRAL_V3_TEMPLATE = (  # Mistral-7B-Instruct-v0.3's shape: the system prompt joins the last message, if a user's
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content'] "
    "+ '[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)


def test_a_template_that_moves_the_system_prompt_scores_the_answer_after_the_prompt(sp_tokenizer):
    """Mistral v0.3 writes the system prompt only into a conversation that ends with the user: with the answer, it
    is gone, so the whole conversation does not start with the prompt. The answer is scored as the template
    writes its turn after that prompt (its opening space, the text, EOS): the same tokens as in a row without a
    system prompt, and the run says how often."""
    tok = copy.deepcopy(sp_tokenizer)
    tok.chat_template = MISTRAL_V3_TEMPLATE
    prompt = [{"role": "system", "content": "Be brief."}, *MSG]
    text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert text == "<s>[INST] Be brief.\n\nWhat is two plus two?[/INST]"
    (kept,), stats = tokenize_pairs(tok, [unify(prompt, "Two.", "Four.", "prefs.jsonl row 1")], 64, 32)
    assert kept.prompt_ids + kept.chosen_ids == tok(text + " Two.</s>", add_special_tokens=False)["input_ids"]
    assert stats.notes[0].startswith("2 responses are scored as their text after the prompt, then EOS")
    (plain,), stats = tokenize_pairs(tok, [unify(MSG, "Two.", "Four.")], 64, 32)  # no system prompt: no fallback
    assert tok.decode(plain.prompt_ids + plain.chosen_ids) == "<s>[INST] What is two plus two?[/INST] Two.</s>"
    assert stats.notes == [] and plain.chosen_ids == kept.chosen_ids  # the same answer tokens either way
    assert tok.convert_ids_to_tokens(kept.chosen_ids[0]).startswith("▁")  # the template's space, joined to the word


def test_a_prompt_that_would_vanish_at_the_boundary_keeps_its_ids(tokenizer):
    """Without a BOS, a prompt that is one word piece of the answer's first word ("Tw" + "o ...") shares no id with
    the whole encoding: it keeps its own ids and the responses are encoded apart, rather than an empty prompt."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = processors.Sequence([])
    (pair,), stats = tokenize_pairs(tok, [Pair("Tw", "o plus two.", "o.")], 64, 32)
    assert pair.prompt_ids == tok("Tw")["input_ids"] and stats.kept == 1
    assert pair.chosen_ids == tok("o plus two.")["input_ids"] + [tok.eos_token_id]


def test_a_template_that_rewrites_answered_turns_is_refused(tokenizer):
    """DeepSeek-R1-style: the generation prompt opens <think>, an answered turn keeps only what follows </think>.
    An answer that writes <think> again has no reading after the prompt (it would be there twice): refused, as is
    a prefilled start the template cuts."""
    from qdpo.errors import UserError

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'].split('</think>')[-1] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
    )
    answer = [{"role": "assistant", "content": "<think>\n2+2 is 4.\n</think>Four."}]
    pair = Pair(MSG, answer, [{"role": "assistant", "content": "Five."}], "prefs.jsonl row 3")
    with pytest.raises(
        UserError, match=r"^prefs.jsonl row 3: the tokenizer's chat template writes the conversation with its answer"
    ):
        tokenize_pairs(tokenizer, [pair], 64, 32)
    prefilled = MSG + [{"role": "assistant", "content": "<think>\nHmm.\n</think>Fo"}]  # a prefill it cuts too
    with pytest.raises(
        UserError, match=r"^prefs.jsonl row 4: the tokenizer's chat template changes the prefilled start"
    ):
        tokenize_pairs(tokenizer, [unify(prefilled, "ur.", "ive.", "prefs.jsonl row 4")], 64, 32)


def test_an_eos_the_tokenizer_appends_to_plain_text_does_not_end_the_prompt(tokenizer):
    """add_eos_token-style tokenizers end every encoding with EOS: the prompt must not, the response once."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)]
    )
    assert tok("Hi")["input_ids"][-1] == tok.eos_token_id
    (pair,), _ = tokenize_pairs(tok, [Pair("What is two plus two?", " Four.", " Five.")], 64, 32)
    assert tok.eos_token_id not in pair.prompt_ids
    assert pair.prompt_ids + pair.chosen_ids == tok("What is two plus two? Four.")["input_ids"]


def test_a_bos_that_is_also_eos_starts_an_empty_prompt(tokenizer):
    """GPT-2-style tokenizers add one token that is both BOS and EOS: it is the BOS of an empty prompt, not an
    appended EOS to strip (the pair would be dropped as having no prompt)."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    tok.bos_token = tok.eos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", tok.eos_token_id)]
    )
    (pair,), stats = tokenize_pairs(tok, [Pair("", "Yes.", "No.")], 24, 8)
    assert stats.kept == 1 and pair.prompt_ids == [tok.eos_token_id]
    assert pair.chosen_ids == tok("Yes.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
