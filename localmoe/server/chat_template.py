"""Which chat template renders a request, and rendering it with the request's tools.

vLLM's pairing is `--chat-template PATH` with `--tool-call-parser NAME`. A checkpoint whose own template
renders tools (Qwen2.5 and later, Mistral's v3 models, Hermes 2 Pro) needs no `--chat-template`; one whose
template ignores them (the built-in model's, Mixtral 8x7B's) is given, for requests that carry tools, the
published template of the parser's family, so the model is shown its tools in the form the parser reads
back. Requests without tools keep the checkpoint's template either way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "data" / "chat_templates"
PARSER_TEMPLATES = {"hermes": "tool_chat_template_hermes.jinja", "mistral": "tool_chat_template_mistral.jinja"}
_TOOLS = re.compile(r"\btools\b")


def load_chat_template(value: str) -> str:
    """`--chat-template`: a file, one of ours by its file name (so vLLM's `examples/tool_chat_template_*.jinja`
    still works), or the template's text itself, as vLLM accepts."""
    path = Path(value)
    if path.is_file():
        return path.read_text()
    bundled = TEMPLATES_DIR / path.name
    if bundled.is_file():
        return bundled.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat template {value!r} is neither a file nor a template (bundled: "
                     f"{', '.join(sorted(p.name for p in TEMPLATES_DIR.glob('*.jinja')))})")


def renders_tools(template: str) -> bool:
    return _TOOLS.search(template) is not None


@dataclass(frozen=True)
class ChatTemplates:
    """The templates a server renders with; None means the tokenizer's own."""

    plain: str | None
    with_tools: str | None

    @classmethod
    def choose(cls, own: str | None, chat_template: str | None, tool_parser: str | None) -> ChatTemplates:
        """`own`: the checkpoint's template; `chat_template`: the --chat-template value, if given."""
        if chat_template is not None:
            template = load_chat_template(chat_template)
            return cls(template, template)
        if tool_parser is not None and not (own is not None and renders_tools(own)):
            return cls(None, load_chat_template(PARSER_TEMPLATES[tool_parser]))
        return cls(None, None)

    def render(self, tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               add_generation_prompt: bool) -> str:
        template = self.with_tools if tools else self.plain
        return tokenizer.apply_chat_template(
            [_arguments_as_objects(m) for m in messages], tools=tools or None, chat_template=template,
            tokenize=False, add_generation_prompt=add_generation_prompt)


def _arguments_as_objects(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's earlier tool calls with their arguments as objects: OpenAI sends them as JSON
    text, and the published templates write them with `tojson` (text would come out quoted twice)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    converted = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                call = {**call, "function": {**function, "arguments": json.loads(arguments)}}
            except ValueError:
                pass  # not JSON: the template shows the text as it came
        converted.append(call)
    return {**message, "tool_calls": converted}
