"""Chat templates: the one a base model's conversations are rendered with, in training and (saved with the adapter)
at inference, and what it writes.

A base model without a chat template gets a default chosen from tokens its vocabulary already has
(ChatML when `<|im_start|>`/`<|im_end|>` exist, else Mistral's `[INST]` format closed by EOS); no
special token is ever added (QLoRA does not train the embeddings). A prelude put before the template keeps the
system prompt where the template would lose it, and renders a hybrid reasoning template in its non-thinking mode.
What closes an assistant turn (`end_of_turn_text`) is read from the template's own renderings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError
from transformers import AutoTokenizer

from job import JobError

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Mistral-Instruct's format: <s>[INST] system\n\nuser [/INST] assistant</s>[INST] user [/INST] ...
INST_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('this template renders only system, user and assistant messages') }}"
    "{% endif %}{% endfor %}"
)


class SkipExample(Exception):
    """This conversation cannot be trained on; the message says why."""


def ensure_chat_template(tokenizer) -> str:
    """Give `tokenizer` a chat template if it has none; return where the template came from."""
    if tokenizer.chat_template:
        return "tokenizer"
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        tokenizer.chat_template = CHATML_TEMPLATE
        return "default-chatml"
    if tokenizer.eos_token is None:
        raise SkipExample("the base model's tokenizer has no chat template and no EOS token to end turns with")
    tokenizer.chat_template = INST_TEMPLATE
    return "default-inst"


def render(tokenizer, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    """The chat template's text; a conversation the template refuses (raise_exception) is skipped."""
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise SkipExample(f"the chat template refuses this conversation ({exc}): change the conversation to what the "
                          "template accepts, or train a base model whose template accepts it") from None


def end_of_turn_text(tokenizer) -> str:
    """The text that closes every assistant turn (e.g. `<|im_end|>`, `</s>`, `<|end|>`): what the template
    writes after an assistant message both in the middle of a conversation and at its end. Their common
    start is the turn's own closer; what follows only one of them belongs to something else: the next
    turn's header, or an end-of-text some templates add after the last turn (Phi-3.5's `<|endoftext|>`)."""
    a1, u2, a2 = "SENTINEL_A1_7f3a", "SENTINEL_U2_7f3a", "SENTINEL_A2_7f3a"
    single = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a2}])
    tail = single[single.rindex(a2) + len(a2):]
    try:
        text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a1},
                                  {"role": "user", "content": u2}, {"role": "assistant", "content": a2}])
        between, last = text[text.index(a1) + len(a1):text.index(u2)], text[text.rindex(a2) + len(a2):]
    except (SkipExample, ValueError):  # a template for single-turn chats only
        return _non_empty(tail.rstrip())
    # the common start in whole tokens: "<|end|>\n<|user|>" and "<|end|>\n<|endoftext|>" share "<|end|>\n"
    return _non_empty(between[:shared_start(tokenizer, between, last)].rstrip())


def shared_start(tokenizer, a: str, b: str) -> int:
    """How many characters of `a` its common start with `b` covers, in whole tokens."""
    encoded = tokenizer(a, add_special_tokens=False, return_offsets_mapping=True)
    other = tokenizer(b, add_special_tokens=False)["input_ids"]
    shared = 0
    while shared < min(len(encoded["input_ids"]), len(other)) and encoded["input_ids"][shared] == other[shared]:
        shared += 1
    return encoded["offset_mapping"][shared - 1][1] if shared else 0


def _non_empty(closer: str) -> str:
    if not closer:
        raise SkipExample("the chat template writes nothing after an assistant message, so the model could not "
                          "learn to stop")
    return closer


# Where a system prompt goes when the template itself drops or refuses it in a training conversation (one
# that ends with the assistant's answer). A prelude run before the template moves it there, in training
# and, saved with the adapter, at inference alike: merged into a user turn, "<system>\n\n<user>", as
# Mistral's and Gemma's own formats do.
_MERGE = "{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[%s]['content']}"
SYSTEM_PRELUDES = {
    # Gemma's documentation puts instructions in the first user turn (Gemma-2 refuses a system role).
    "first user turn": (
        "{%- if messages and messages[0]['role'] == 'system' and messages|length > 1 and messages[1]['role'] == 'user'"
        " and messages[0]['content'] is string and messages[1]['content'] is string -%}"
        "{%- set messages = [" + _MERGE % "1" + "] + messages[2:] -%}"
        "{%- endif -%}"),
    # Mistral-Instruct's template puts it in the last user turn, but only when that turn ends the conversation.
    "last user turn": (
        "{%- if messages and messages[0]['role'] == 'system' and messages[0]['content'] is string -%}"
        "{%- set ns_sys = namespace(last=0) -%}"
        "{%- for m in messages -%}{%- if m['role'] == 'user' and m['content'] is string -%}"
        "{%- set ns_sys.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
        "{%- if ns_sys.last > 0 -%}"
        "{%- set messages = messages[1:ns_sys.last] + [" + _MERGE % "ns_sys.last" + "] + messages[ns_sys.last + 1:] -%}"
        "{%- endif -%}{%- endif -%}"),
}


def system_prompt_placement(tokenizer) -> str:
    """Where the template puts a system prompt in a training conversation: "template" when it renders the
    text itself; else where the model's format puts it at inference: "last user turn" when the template
    attaches it to the final user message (Mistral-Instruct v0.3), "first user turn" when it refuses or
    drops it everywhere (Gemma-2)."""
    system, u1, a1, u2 = "SENTINEL_SYS_7f3a", "SENTINEL_U1_7f3a", "SENTINEL_A1_7f3a", "SENTINEL_U2_7f3a"
    head = [{"role": "system", "content": system}, {"role": "user", "content": u1},
            {"role": "assistant", "content": a1}]
    try:
        if system in render(tokenizer, head):
            return "template"
        asked = render(tokenizer, head + [{"role": "user", "content": u2}], add_generation_prompt=True)
    except SkipExample:  # refuses a system role
        return "first user turn"
    if system in asked and asked.index(system) > asked.index(a1):
        return "last user turn"
    return "first user turn"


@dataclass(frozen=True)
class ChatFormat:
    """How a base model's conversations are rendered for training (and, saved with the adapter, at inference)."""

    source: str  # where the template came from: "tokenizer", "default-chatml", "default-inst"
    end_of_turn: str  # what closes every assistant turn; trained after each answer
    system_prompt: str  # "template", or the user turn the prelude merges it into
    non_thinking: bool = False  # a hybrid reasoning template, rendered (and saved) in its non-thinking mode

    def describe(self) -> dict:
        how = ("rendered by the template" if self.system_prompt == "template" else
               f"merged into the {self.system_prompt} ('<system>\\n\\n<user>'): the template drops or refuses a "
               "system role; the saved template does the same at inference")
        described = {"template_source": self.source, "end_of_turn": self.end_of_turn, "system_prompt": how}
        if self.non_thinking:
            described["reasoning"] = ("non-thinking mode (enable_thinking false): the answers carry no reasoning; "
                                      "the saved template defaults to it")
        return described


# Hybrid reasoning templates (Qwen3, SmolLM3) switch modes with `enable_thinking`, on by default. The answers
# trained here carry no reasoning: they are rendered in the non-thinking mode (Qwen3: an empty think block before
# the answer; SmolLM3: "/no_think"), and the template saved with the adapter defaults to it, so that a plain
# apply_chat_template at inference prompts the model as it was trained.
NON_THINKING_PRELUDE = "{%- if enable_thinking is not defined -%}{%- set enable_thinking = false -%}{%- endif -%}"


def prepare_chat_template(tokenizer) -> ChatFormat:
    """Give `tokenizer` the chat template training and inference use (its own, or a default from tokens it
    has; with a prelude where the template would lose the system prompt or assume reasoning), and describe it."""
    source = ensure_chat_template(tokenizer)
    non_thinking = "enable_thinking" in str(tokenizer.chat_template)
    if non_thinking:
        _prepend(tokenizer, NON_THINKING_PRELUDE)
    placement = system_prompt_placement(tokenizer)
    if placement != "template":
        _prepend(tokenizer, SYSTEM_PRELUDES[placement])
    return ChatFormat(source, end_of_turn_text(tokenizer), placement, non_thinking)


def _prepend(tokenizer, prelude: str) -> None:
    """Put `prelude` before the chat template (each of them, for a tokenizer with named templates)."""
    template = tokenizer.chat_template
    tokenizer.chat_template = ({name: prelude + t for name, t in template.items()} if isinstance(template, dict)
                               else prelude + template)


def end_of_turn_token(tokenizer, eot_text: str) -> str:
    """The single token that ends an assistant turn (the last token of the end-of-turn text)."""
    ids = tokenizer(eot_text, add_special_tokens=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids[-1])


def supports_tools(tokenizer) -> bool:
    return "tool" in (tokenizer.chat_template or "")


def load_tokenizer(base_model: Path, trust_remote_code: bool = False):
    """The tokenizer with the chat template training uses (its own, or a default from tokens it has; the
    system prompt kept where the template would lose it), and how that template renders (a ChatFormat)."""
    tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    try:
        chat_format = prepare_chat_template(tokenizer)
    except SkipExample as exc:
        raise JobError(f"the base model {base_model.name} cannot be used for chat training: {exc}") from None
    if chat_format.system_prompt != "template":
        log.info("the chat template of %s drops or refuses a system prompt: it is merged into the %s", base_model.name,
                 chat_format.system_prompt)
    return tokenizer, chat_format

