"""An instruct model's own chat template (Jinja2), rendered as transformers' apply_chat_template renders it.

The environment is transformers' (utils/chat_template_utils.py): a sandbox that cannot change
what it is given, trim_blocks and lstrip_blocks, {% break %} / {% continue %}, a `tojson` that
does not escape HTML, `raise_exception`, `strftime_now`, and {% generation %} blocks (which only
mark text for training, so they render their body). The variables are `messages`,
`add_generation_prompt`, `tools` and `documents` (always none here), and the special tokens
that are set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.tokenizer import ChatTokenizer

# For encode, message i's content is rendered as the one character chr(_SENTINEL + i) of Unicode's
# plane-15 private use area, to find where the template puts it.
_SENTINEL = 0xF0000
_MAX_MESSAGES = 0xFFFFD - _SENTINEL + 1
_SENTINELS = re.compile("([\U000f0000-\U000ffffd])")


class ChatTemplateError(ValueError):
    """A template that does not compile, or raises for these messages (raise_exception)."""


class ChatTemplate:
    """A chat template compiled once; renders text, or token ids in which no message forges a marker."""

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc
        # as transformers passes its special_tokens_map: only the tokens that are set
        tokens = {"bos_token": bos_token, "eos_token": eos_token}
        self._tokens = {name: token for name, token in tokens.items() if token is not None}

    @classmethod
    def for_tokenizer(cls, tokenizer: ChatTokenizer) -> ChatTemplate:
        """The template of an instruct model's tokenizer, with its tokens."""
        if tokenizer.chat_template is None:
            raise ChatTemplateError("the tokenizer has no chat template")
        return cls(tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt as text, exactly as apply_chat_template(messages, tokenize=False) gives it."""
        if not messages:
            raise ChatTemplateError("there are no messages to render")
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],  # copies: the template sees plain dicts
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._tokens,
            )
        except Exception as exc:  # a template is code from the model's folder: what it raises is its error
            raise ChatTemplateError(f"the chat template failed for these messages: {exc}") from exc

    def encode(
        self, tokenizer: ChatTokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered prompt: the template's own text with its special tokens (encode_with_specials),
        every message's content as plain text (encode), so text a user types that looks like <|im_end|>, <|eot_id|>
        or </s> stays text.

        Usually that is tokenizer.encode_with_specials(render(messages)), token for token: the template's text and
        the contents are encoded together, as transformers does. Only when a content would add a special token
        are the pieces encoded one by one, the contents as plain text; where a template changes a content
        (Llama 3's trim), that content then goes in as given.
        """
        if len(messages) > _MAX_MESSAGES:
            raise ChatTemplateError(f"at most {_MAX_MESSAGES} messages can be encoded")
        ids = tokenizer.encode_with_specials(self.render(messages, add_generation_prompt=add_generation_prompt))
        stand_ins = [{**m, "content": chr(_SENTINEL + i)} for i, m in enumerate(messages)]
        shape = self.render(stand_ins, add_generation_prompt=add_generation_prompt)
        special = tokenizer.special_ids
        markers = [i for i in ids if i in special]
        if markers == [i for i in tokenizer.encode_with_specials(shape) if i in special]:
            return ids  # every special token is one the template wrote
        ids = []
        for n, piece in enumerate(_SENTINELS.split(shape)):  # template text, sentinel, template text, ...
            if n % 2:
                ids += tokenizer.encode(messages[ord(piece) - _SENTINEL]["content"])
            elif piece:
                ids += tokenizer.encode_with_specials(piece)
        return ids


class _Generation(jinja2.ext.Extension):
    """{% generation %}…{% endgeneration %}: marks an assistant's text for training masks; renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates expect json.dumps
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
