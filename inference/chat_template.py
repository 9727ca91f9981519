"""Chat messages -> a model's prompt text, by the chat template its tokenizer ships.

The template is tokenizer_config.json's "chat_template" (a string, or a list of named
templates of which "default" is used), or a chat_template.jinja file next to it (where
newer transformers versions save it). It is rendered as transformers' apply_chat_template
renders it: jinja2's immutable sandbox with trim_blocks and lstrip_blocks, the loopcontrols
extension, and the helpers templates call (raise_exception, tojson, strftime_now); the
tokenizer's special tokens (bos_token, eos_token, ...) are variables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its raise_exception), or failed to render it."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # as transformers: jinja's own tojson escapes HTML characters, which a prompt must not get
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class ChatTemplate:
    source: str                     # the jinja template
    special: dict[str, str]         # bos_token, eos_token, ... (those the tokenizer config names)

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate | None:
        """The folder's chat template, or None where it has none."""
        config: dict = {}
        path = Path(folder) / "tokenizer_config.json"
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except ValueError as e:
                raise ChatTemplateError(f"{path} is not valid JSON: {e}") from None
        source = config.get("chat_template")
        if isinstance(source, list):     # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        jinja_file = Path(folder) / "chat_template.jinja"
        if not source and jinja_file.is_file():
            source = jinja_file.read_text()
        if not isinstance(source, str) or not source.strip():
            return None
        special = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
        return cls(source, special)

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._compiled = env.from_string(self.source)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for messages ([{"role": ..., "content": ...}, ...])."""
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special)
        except Exception as e:  # noqa: BLE001 - a template is code: whatever it raises is its refusal
            raise ChatTemplateError(str(e) or type(e).__name__) from None
