"""Turn preference pairs into token ids, following the DPO convention TRL uses (1.x: prompt and response
encoded together, the response being what follows the prompt's ids).

prompt ids   = the tokenizer's encoding of the prompt (chat template with the generation prompt for
               conversational rows, or the prefilled answer start left open; the template already holds BOS,
               so no special tokens are added);
response ids = the ids that follow the prompt's in the encoding of prompt + response, then EOS (unless the chat
               template already ended the turn with EOS: never two). Where the tokenizer joins the prompt's end
               with a response's start, the prompt keeps the ids both share; the run says how often.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qdpo.data import Pair
from qdpo.errors import UserError


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair; only chosen/rejected ids are scored."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    origin: str = field(default="", compare=False)  # where the pair came from ("prefs.jsonl row 3"), for messages
    # Tokens cut by truncation (prompt from the left, responses from the right), for previews and reports.
    cut: tuple[int, int, int] = field(default=(0, 0, 0), compare=False)
    desirable: bool | None = None  # KTO: whether the answer (in chosen) is desirable; rejected is the KL sample

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class TokenizeStats:
    """What tokenization kept, dropped and cut, for the run's report."""

    kept: int = 0
    dropped_empty: int = 0
    dropped_identical: int = 0
    dropped_too_long: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    notes: list[str] = field(default_factory=list)
    unit: str = "pairs"  # "examples" for KTO's single answers

    def describe(self) -> str:
        """One line for the console."""
        same = f"{self.dropped_identical} with chosen == rejected, " if self.unit == "pairs" else ""
        return (
            f"{self.kept} {self.unit} kept; dropped {self.dropped_empty} with an empty prompt or response, "
            f"{same}{self.dropped_too_long} that do not fit max_length; "
            f"cut {self.prompts_truncated} prompts (from the left) and {self.responses_truncated} "
            "responses (from the right)"
        )


def _template_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a chat template raises on messages it refuses (jinja2 ships with transformers)."""
    try:
        from jinja2 import TemplateError
    except ImportError:
        return ()
    return (TemplateError,)


def text_is_empty(t: str | list[dict[str, str]]) -> bool:
    """True when a text, or every message of one, is blank."""
    if isinstance(t, str):
        return not t.strip()
    return all(not m["content"].strip() for m in t)


class Unsplittable(ValueError):
    """The chat template does not render prompt + response as the prompt's rendering followed by more text."""

    def __init__(self, prefilled: bool = False) -> None:
        super().__init__("prefilled" if prefilled else "answer")
        self.prefilled = prefilled  # the template changed the prompt's own (prefilled) assistant turn


def _prefilled(prompt: list[dict[str, str]]) -> bool:
    """A prompt that ends with the start of the assistant's answer, which the response continues."""
    return bool(prompt) and prompt[-1]["role"] == "assistant"


def render_prompt(tokenizer, prompt: list[dict[str, str]]) -> str:
    """The chat template's text of a prompt: the generation prompt, or an answer's prefilled start left open."""
    if _prefilled(prompt):
        try:
            return tokenizer.apply_chat_template(prompt, continue_final_message=True, tokenize=False)
        except ValueError:  # transformers: the template dropped part of the prefilled text
            raise Unsplittable(prefilled=True) from None
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def _render_whole(tokenizer, prompt: list[dict[str, str]], response: list[dict[str, str]]) -> str:
    if _prefilled(prompt):  # the response continues the prefilled turn: one assistant message, not two
        first = {**prompt[-1], "content": prompt[-1]["content"] + response[0]["content"]}
        return tokenizer.apply_chat_template(prompt[:-1] + [first] + response[1:], tokenize=False)
    return tokenizer.apply_chat_template(prompt + response, tokenize=False)


def _appends_eos(tokenizer) -> bool:
    """Whether the tokenizer ends every plain encoding with EOS (add_eos_token), beyond the text's own tokens."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return (
        len(with_special) > len(plain)
        and with_special[-1] == tokenizer.eos_token_id
        and plain[-1:] != [tokenizer.eos_token_id]
    )


def _encode_text(tokenizer, text: str, appends_eos: bool) -> list[int]:
    """Plain text with the tokenizer's own special tokens, less an EOS it appends (appends_eos: add_eos_token): a
    prompt must not end its sequence, and a response gets its one EOS later."""
    ids = tokenizer(text)["input_ids"]
    return ids[:-1] if ids and appends_eos else ids


def _dedupe_bos(tokenizer, ids: list[int], fixed: list[str] | None) -> list[int]:
    """A doubled BOS (the text or template writes one, the tokenizer adds another) cut to one; "bos" to fixed."""
    bos, extra = tokenizer.bos_token_id, 0
    while bos is not None and extra + 1 < len(ids) and ids[extra] == ids[extra + 1] == bos:
        extra += 1
    if extra and fixed is not None:
        fixed.append("bos")
    return ids[extra:]


def _prompt_text_and_ids(tokenizer, prompt: str | list[dict[str, str]], appends_eos: bool) -> tuple[str, list[int]]:
    """The prompt's text (the chat template's, for messages) and its ids, a doubled BOS not yet cut."""
    if isinstance(prompt, list):
        text = render_prompt(tokenizer, prompt)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]
    return prompt, _encode_text(tokenizer, prompt, appends_eos)


def encode_prompt(tokenizer, prompt: str | list[dict[str, str]], fixed: list[str] | None = None) -> list[int]:
    """Token ids of a prompt alone (to generate from): chat template + generation prompt for messages, plain
    encoding otherwise, a doubled BOS cut to one ("bos" goes to fixed)."""
    return _dedupe_bos(tokenizer, _prompt_text_and_ids(tokenizer, prompt, _appends_eos(tokenizer))[1], fixed)


def _repeats_the_prompt_end(prompt_text: str, content: str) -> bool:
    """Whether the answer starts with the end of the prompt's text (R1-style data writing "<think>" again)."""
    tail = prompt_text[-64:]
    return any(len(tail[k:].strip()) >= 3 and content.startswith(tail[k:]) for k in range(len(tail)))


SENTINELS = ("Xq9", "Zq9")  # two one-message answers that differ from their first character on


def _common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _after_prompt(tokenizer, prompt_text: str, prompt: list[dict[str, str]], content: str) -> str:
    """The text of a one-message answer as the template writes it after the prompt it generates from: the turn's
    opening the generation prompt lacks (Mistral v0.3's space), the content as written, and the turn's end."""
    a, b = (
        tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": x}], tokenize=False)
        for x in SENTINELS
    )
    start = _common_prefix(a, b)  # where the answer's content begins
    if a[start : start + len(SENTINELS[0])] != SENTINELS[0]:
        raise Unsplittable()
    before, end = a[:start], a[start + len(SENTINELS[0]) :]
    # The generation prompt's end is the place in `before` that ends the way prompt_text ends (the question and
    # the turn marker); what follows it there is the turn's opening.
    cut = max(range(max(0, start - 64), start + 1), key=lambda e: (_common_suffix(before[:e], prompt_text), e))
    opening = before[cut:] if _common_suffix(before[:cut], prompt_text) >= 4 else ""
    return opening + content + end


def _whole_ids(tokenizer, prompt, prompt_text: str, response, appends_eos: bool, fixed: list[str]) -> list[int]:
    """The ids of prompt + response as the model reads them, before the response's EOS is settled."""
    if not isinstance(response, list):
        return _encode_text(tokenizer, prompt + response, appends_eos)
    whole = _render_whole(tokenizer, prompt, response)
    if not whole.startswith(prompt_text):
        # The template writes an answered conversation unlike the prompt it generates from (Mistral v0.3 drops the
        # system prompt once the last message is not the user's; R1-style templates strip reasoning). One answer
        # message is scored as the model would write it after that prompt: the turn's own opening and end around
        # the content as written. Several, an answer that repeats the prompt's end, or a prefilled turn the
        # template changes have no such reading.
        content = response[0]["content"]
        if _prefilled(prompt):
            raise Unsplittable(prefilled=True)
        if len(response) > 1 or _repeats_the_prompt_end(prompt_text, content):
            raise Unsplittable()
        whole = prompt_text + _after_prompt(tokenizer, prompt_text, prompt, content)
        fixed.append("generated")
    return tokenizer(whole, add_special_tokens=False)["input_ids"]


def _common_prefix(a, b) -> int:  # two lists or two strings
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(
    tokenizer,
    prompt: str | list[dict[str, str]],
    chosen: str | list[dict[str, str]],
    rejected: str | list[dict[str, str]],
    fixed: list[str] | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected ids: each response is the tokens that follow the prompt's in the encoding of
    prompt + response (the sequence as the model reads it), ending in exactly one EOS.

    Encoded alone, a response can start with a token the whole text never has (a SentencePiece tokenizer's "▁"
    before the first word). Where the tokenizer joins the prompt's last characters with a response's first (a
    prompt ending with a space), the prompt keeps the ids both sequences share and the rest belongs to the
    responses ("boundary" goes to fixed). Raises Unsplittable when a chat template gives the answer no place after
    the prompt's text.
    """
    fixed = [] if fixed is None else fixed
    appends_eos = _appends_eos(tokenizer)
    prompt_text, prompt_ids = _prompt_text_and_ids(tokenizer, prompt, appends_eos)
    responses = (chosen, rejected)
    wholes = [_whole_ids(tokenizer, prompt, prompt_text, r, appends_eos, fixed) for r in responses]
    shared = min(_common_prefix(prompt_ids, whole) for whole in wholes)
    if shared < len(prompt_ids):
        fixed.append("boundary")
    if shared == 0 and prompt_ids:  # the prompt would vanish (one word piece, no BOS): the responses go apart
        texts = [_response_text(tokenizer, prompt, prompt_text, response) for response in responses]
        wholes, shared = (
            [prompt_ids + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
            len(prompt_ids),
        )
    chosen_ids, rejected_ids = (_finish_response(tokenizer, whole[shared:], fixed) for whole in wholes)
    return _dedupe_bos(tokenizer, prompt_ids[:shared], fixed), chosen_ids, rejected_ids


def _response_text(tokenizer, prompt, prompt_text: str, response) -> str:
    """A response's own text: plain, or what the chat template writes for it after the prompt."""
    if not isinstance(response, list):
        return response
    whole = _render_whole(tokenizer, prompt, response)
    return whole[len(prompt_text) :] if whole.startswith(prompt_text) else response[0]["content"]


def _finish_response(tokenizer, ids: list[int], fixed: list[str]) -> list[int]:
    """End a response at one EOS ("eos" to fixed when the text and the template both closed the turn)."""
    ids = _end_with_one_eos(tokenizer, ids)
    if len(ids) > 1 and ids[-2] == ids[-1] == tokenizer.eos_token_id:
        while len(ids) > 1 and ids[-2] == ids[-1]:
            ids = ids[:-1]
        fixed.append("eos")
    return ids


def _end_with_one_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(
            "the tokenizer has no EOS token, so responses cannot end; add eos_token to its tokenizer_config.json "
            "(or pass tokenizer=DIR with one that has it)."
        )
    if eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        # The template closed the turn with EOS and maybe a newline after it: end at that EOS.
        if not tokenizer.decode(ids[last + 1 :]).strip():
            return ids[: last + 1]
    return ids + [eos]


def tokenize_pairs(
    tokenizer, pairs: list[Pair], max_length: int, max_prompt_length: int
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize, truncate and filter pairs; return the kept pairs and what happened to the rest."""
    stats = TokenizeStats()
    if any(p.conversational for p in pairs) and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the data has chat messages but the model's tokenizer has no chat template; "
            "use plain-text prompts, an instruct model, or tokenizer=DIR with a chat template."
        )
    out, fixed = [], []
    if any(p.desirable is not None for p in pairs):
        stats.unit = "examples"
    for number, pair in enumerate(pairs, start=1):
        if text_is_empty(pair.chosen) or text_is_empty(pair.rejected):
            stats.dropped_empty += 1
            continue
        kto = pair.desirable is not None  # the KL sample may equal the answer: it is a sample, not a rival
        if pair.chosen == pair.rejected and not kto:
            stats.dropped_identical += 1
            continue
        fixes: list[str] = []  # what was fixed in this pair: counted only if the pair is kept
        try:
            prompt, chosen, rejected = encode_pair(tokenizer, pair.prompt, pair.chosen, pair.rejected, fixes)
        except Unsplittable as e:
            if e.prefilled:
                raise UserError(
                    f"{pair.origin or f'pair {number}'}: the tokenizer's chat template changes the prefilled start "
                    "of the answer (the prompt's last, assistant message), so the answer cannot continue it; give "
                    "plain-text prompts and responses, or set tokenizer= to one whose template keeps that turn."
                ) from None
            raise UserError(
                f"{pair.origin or f'pair {number}'}: the tokenizer's chat template writes the conversation with "
                "its answer so that it does not start with the prompt's own text, and this answer cannot simply "
                "follow the prompt (it has several messages, or it repeats the prompt's end, e.g. <think>); give "
                "plain-text prompts and responses, or set tokenizer= to one whose template keeps the prompt."
            ) from None
        except _template_errors() as e:  # e.g. "Conversation roles must alternate user/assistant/..."
            reason = " ".join(str(e).split()).rstrip(".") or type(e).__name__
            reason = reason if len(reason) <= 160 else reason[:157] + "..."
            raise UserError(
                f"{pair.origin or f'pair {number}'}: the tokenizer's chat template refused the messages "
                f"({reason}); fix the roles or set tokenizer= to one whose template takes them."
            ) from None
        if not prompt:  # an empty prompt and no BOS: no position predicts the first response token
            stats.dropped_empty += 1
            continue
        if chosen == rejected and not kto:  # different texts, same tokens (e.g. roles the template ignores)
            stats.dropped_identical += 1
            continue
        full = len(prompt), len(chosen), len(rejected)
        prompt = prompt[-max_prompt_length:]  # keep the end: it holds the question and the turn marker
        budget = max_length - len(prompt)
        chosen, rejected = chosen[:budget], rejected[:budget]
        if chosen == rejected and not kto:  # the difference lay past max_length: nothing left to prefer
            stats.dropped_too_long += 1
            continue
        cut = (full[0] - len(prompt), full[1] - len(chosen), full[2] - len(rejected))
        fixed += fixes
        # Counted on kept pairs, per response; KTO's rejected is another example's answer (its KL sample).
        stats.prompts_truncated += cut[0] > 0
        stats.responses_truncated += (cut[1] > 0) + (cut[2] > 0 and not kto)
        out.append(TokenizedPair(prompt, chosen, rejected, pair.origin, cut, pair.desirable))
    stats.kept = len(out)
    # A second BOS or EOS would be scored as text (DPO users' most reported tokenization bug): say it happened.
    if fixed.count("bos"):
        stats.notes.append(
            f"{fixed.count('bos')} prompts started with two BOS tokens (the text or chat template "
            "writes one and the tokenizer adds one); qdpo kept one"
        )
    if fixed.count("boundary"):
        stats.notes.append(
            f"{fixed.count('boundary')} prompts end in characters the tokenizer joins with the response's first "
            "(e.g. a trailing space); their last tokens are scored as the start of the responses"
        )
    if fixed.count("generated"):
        stats.notes.append(
            f"{fixed.count('generated')} responses are scored as their text after the prompt, then EOS: the chat "
            "template writes an answered conversation differently from the prompt it generates from (e.g. it "
            "moves the system prompt)"
        )
    if fixed.count("eos"):
        stats.notes.append(
            f"{fixed.count('eos')} responses ended with two EOS tokens (the text ends with "
            f"{tokenizer.eos_token!r} and the turn is closed again); qdpo kept one"
        )
    return out, stats
