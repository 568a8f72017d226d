"""Dataset formats: which columns play which role, and how a row becomes text with loss spans (encoding.py turns
that text into tokens).

Four formats:
- text: causal LM on a document; every token carries loss.
- instruction: prompt (+ optional input) -> response; loss on the response and its end-of-turn token only. Rendered
  with the tokenizer's chat template when it has one (user turn = prompt + input, assistant turn = response),
  else with a plain "### Instruction / ### Input / ### Response" template ending in the EOS token.
- chat: a list of {role, content} messages (ShareGPT's {from, value} too) rendered with the chat template; loss on
  the assistant turns only.
- classification: text + label; the loss is on the class, not on tokens.

Loss spans are character ranges of the rendered text. A conversation is rendered once (rows are rendered in
batches), then each message's content is found in that text in order, each search starting where the previous
message ended, so the cost grows with the text and not with the square of the number of turns. An assistant turn
spans from the end of the generation prompt before it (what `add_generation_prompt` adds, e.g.
"<|im_start|>assistant\n"; anything the template writes between it and the content, like Qwen3's empty think
block, trains too) to the end of its content plus the closing marker the template puts after a reply (e.g.
"<|im_end|>"). Both markers are learnt once per tokenizer from a probe conversation. A candidate position with no
generation prompt since the previous message is skipped, so a reply that also appears in the user's text is found
where the assistant says it. The whole text is tokenized once and a token carries loss when its character offsets
overlap a loss span, so training sees exactly the tokens that the template produces in one piece.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from studio.core.errors import DataError, first_line

Format = Literal["text", "instruction", "chat", "classification"]
FORMATS: tuple[Format, ...] = ("text", "instruction", "chat", "classification")

# Column names recognised for each role, most specific first (compared case-insensitively).
ROLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "text": ("text", "content", "document", "sentence"),
    "prompt": ("instruction", "prompt", "question", "query", "input"),
    "input": ("input", "context"),
    "response": ("response", "output", "answer", "completion"),
    "messages": ("messages", "conversations", "conversation"),
    "label": ("label", "labels", "class", "category", "target"),
}
REQUIRED_ROLES: dict[Format, tuple[str, ...]] = {
    "text": ("text",),
    "instruction": ("prompt", "response"),
    "chat": ("messages",),
    "classification": ("text", "label"),
}
OPTIONAL_ROLES: dict[Format, tuple[str, ...]] = {"instruction": ("input",)}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
PLAIN_INSTRUCTION = "### Instruction:\n{prompt}\n\n"
PLAIN_INPUT = "### Input:\n{input}\n\n"
PLAIN_RESPONSE = "### Response:\n"
PROBE_USER, PROBE_REPLY = "Ping from the studio", "Pong from the studio"  # learn a template's markers (Renderer)
RENDER_BATCH = 1024  # conversations per apply_chat_template call


class RowProblem(Exception):
    """One row cannot be used; the message is the reason shown to the user next to the row number."""


@dataclass(frozen=True)
class Rendered:
    """A row as text. `loss_spans` are [start, end) character ranges of `text` that carry loss. `eos_loss` says
    whether an EOS token is appended (and carries loss) after the text. `label` is the raw class label."""

    text: str
    loss_spans: tuple[tuple[int, int], ...]
    templated: bool
    eos_loss: bool
    label: Any = None


def _find_column(columns: Sequence[str], role: str, taken: set[str]) -> str | None:
    by_lower = {c.lower(): c for c in columns if c not in taken}
    for name in ROLE_COLUMNS[role]:
        if name in by_lower:
            return by_lower[name]
    return None


def resolve_columns(fmt: Format, columns: Sequence[str], mapping: Mapping[str, str] | None = None) -> dict[str, str]:
    """Role -> column for `fmt`: explicit `mapping` entries first, then the usual names. Raises DataError naming what
    is missing and the columns that exist."""
    mapping = dict(mapping or {})
    roles = REQUIRED_ROLES[fmt] + OPTIONAL_ROLES.get(fmt, ())
    unknown = sorted(set(mapping) - set(roles))
    if unknown:
        raise DataError(f"column roles {unknown} do not apply to the {fmt} format (its roles: {', '.join(roles)})")
    for role, column in mapping.items():
        if column not in columns:
            raise DataError(f"the {role} column {column!r} is not in the data; its columns: {', '.join(columns)}")
    resolved: dict[str, str] = {}
    taken = set(mapping.values())
    for role in roles:
        column = mapping.get(role) or _find_column(columns, role, taken)
        if column is None:
            if role in REQUIRED_ROLES[fmt]:
                names = ROLE_COLUMNS[role]
                near = [c for c in columns if c not in taken and difflib.get_close_matches(c.lower(), names)]
                advice = f"is `{near[0]}` the {role} column? map it explicitly" if near else "map one explicitly"
                raise DataError(
                    f"the {fmt} format needs a {role} column (one of {', '.join(ROLE_COLUMNS[role])}); the data has "
                    f"{', '.join(columns) or 'no columns'}: {advice}"
                )
            continue
        resolved[role] = column
        taken.add(column)
    return resolved


def detect_format(columns: Sequence[str], mapping: Mapping[str, str] | None = None) -> Format:
    """The first of chat, instruction, classification, text whose roles the columns (and `mapping`) fill."""
    mapping = dict(mapping or {})
    for fmt in ("chat", "instruction", "classification", "text"):
        if set(mapping) - set(REQUIRED_ROLES[fmt] + OPTIONAL_ROLES.get(fmt, ())):
            continue  # the mapping names roles of another format
        try:
            resolve_columns(fmt, columns, mapping)
        except DataError:
            continue
        return fmt
    raise DataError(
        f"cannot tell the format from the columns {', '.join(columns) or '(none)'}: expected a text, prompt+response, "
        "messages or text+label column; choose the format and map the columns"
    )


class Renderer:
    """Renders rows of one format for one tokenizer into text with loss spans."""

    def __init__(self, tokenizer: Any, fmt: Format, columns: Mapping[str, str]) -> None:
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.columns = dict(columns)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        if fmt == "chat" and not self.has_template:
            raise DataError(
                "the chat format needs a tokenizer with a chat template and this model's has none: "
                "use the instruction format or a chat model"
            )
        self.eos_id = tokenizer.eos_token_id
        self._markers: tuple[str, str] | None = None  # (generation prompt, closing marker), probed once

    def render(self, row: Mapping[str, Any]) -> Rendered:
        """One row as text with loss spans. Raises RowProblem saying why the row cannot be used."""
        (rendered,) = self.render_rows([row])
        if isinstance(rendered, RowProblem):
            raise rendered
        return rendered

    def render_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[Rendered | RowProblem]:
        """Each row as text with loss spans, or the RowProblem that keeps it out. Templated rows are rendered in
        batches of RENDER_BATCH conversations."""
        out: list[Rendered | RowProblem] = []
        if self.fmt in ("text", "classification") or (self.fmt == "instruction" and not self.has_template):
            for row in rows:
                try:
                    out.append(self._render_plain(row))
                except RowProblem as exc:
                    out.append(exc)
            return out
        conversations: list[list[dict[str, str]] | RowProblem] = []
        for row in rows:
            try:
                conversations.append(self._instruction_messages(row) if self.fmt == "instruction" else
                                     self._messages(row))
            except RowProblem as exc:
                conversations.append(exc)
        for first in range(0, len(conversations), RENDER_BATCH):
            out.extend(self._render_conversations(conversations[first:first + RENDER_BATCH]))
        return out

    # -- plain rows --------------------------------------------------------------------------------------------------
    def _render_plain(self, row: Mapping[str, Any]) -> Rendered:
        if self.fmt == "text":
            text = self._text(row, "text")
            return Rendered(text, ((0, len(text)),), templated=False, eos_loss=self.eos_id is not None)
        if self.fmt == "classification":
            return Rendered(self._text(row, "text"), (), templated=False, eos_loss=False, label=self._label(row))
        prompt, extra, response = self._instruction_parts(row)
        head = plain_instruction_prompt(prompt, extra)
        return Rendered(head + response, ((len(head), len(head) + len(response)),), templated=False,
                        eos_loss=self.eos_id is not None)

    def _text(self, row: Mapping[str, Any], role: str, required: bool = True) -> str:
        column = self.columns[role]
        value = row.get(column)
        if value is None:
            if required:
                raise RowProblem(f"no {column!r} value")
            return ""
        if not isinstance(value, str):
            raise RowProblem(f"{column!r} is {type(value).__name__}, expected text")
        if required and not value.strip():
            raise RowProblem(f"{column!r} is empty")
        return value

    def _label(self, row: Mapping[str, Any]) -> str | int:
        column = self.columns["label"]
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise RowProblem(f"no {column!r} value")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise RowProblem(f"{column!r} is {type(value).__name__}, expected a label name or an integer")
        if isinstance(value, int) and value < 0:
            raise RowProblem(f"{column!r} is {value}; integer labels must be 0 or more")
        return value.strip() if isinstance(value, str) else value

    def _instruction_parts(self, row: Mapping[str, Any]) -> tuple[str, str, str]:
        prompt = self._text(row, "prompt")
        extra = self._text(row, "input", required=False) if "input" in self.columns else ""
        return prompt, extra, self._text(row, "response")

    # -- conversations -----------------------------------------------------------------------------------------------
    def _instruction_messages(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        prompt, extra, response = self._instruction_parts(row)
        user = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        return [{"role": "user", "content": user}, {"role": "assistant", "content": response}]

    def _messages(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        column = self.columns["messages"]
        value = row.get(column)
        if isinstance(value, str):  # CSV cells hold conversations as JSON text
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise RowProblem(f"{column!r} is text that is not a JSON list of messages ({exc.msg})") from exc
        if value is None:
            raise RowProblem(f"no {column!r} value")
        if not isinstance(value, list) or not value:
            raise RowProblem(f"{column!r} must be a non-empty list of messages")
        messages = []
        for n, message in enumerate(value, 1):
            if not isinstance(message, dict):
                raise RowProblem(f"message {n} is {type(message).__name__}, expected {{role, content}}")
            role = SHAREGPT_ROLES.get(str(message.get("role", message.get("from"))))
            content = message.get("content", message.get("value"))
            if role is None:
                raise RowProblem(f"message {n} has role {message.get('role', message.get('from'))!r}; "
                                 "expected system, user or assistant")
            if not isinstance(content, str):
                raise RowProblem(f"message {n} has {type(content).__name__} content, expected text")
            if role == "assistant" and not content.strip():
                raise RowProblem(f"message {n} (assistant) is empty")
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            raise RowProblem("the conversation has no assistant message to learn from")
        return messages

    def _apply_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # noqa: BLE001 - templates raise jinja errors of their own (e.g. role order)
            raise RowProblem(f"the chat template rejects this conversation: {first_line(exc)}") from exc

    def _render_conversations(
        self, conversations: Sequence[list[dict[str, str]] | RowProblem]
    ) -> list[Rendered | RowProblem]:
        good = [c for c in conversations if not isinstance(c, RowProblem)]
        texts: list[str | RowProblem] = []
        try:  # one call for the batch; a template error in any conversation sends the batch one by one
            texts = list(self.tokenizer.apply_chat_template(good, tokenize=False)) if good else []
        except Exception:  # noqa: BLE001 - see _apply_template; the per-row call names the row's own error
            texts = []
            for conversation in good:
                try:
                    texts.append(self._apply_template(conversation))
                except RowProblem as exc:
                    texts.append(exc)
        rendered = iter(texts)
        out: list[Rendered | RowProblem] = []
        for conversation in conversations:
            if isinstance(conversation, RowProblem):
                out.append(conversation)
                continue
            text = next(rendered)
            try:
                out.append(text if isinstance(text, RowProblem) else self._with_spans(conversation, text))
            except RowProblem as exc:
                out.append(exc)
        return out

    def _with_spans(self, messages: list[dict[str, str]], full: str) -> Rendered:
        """Loss spans of the assistant turns in `full` (see the module docstring): one pass over the messages."""
        header, closing = self._template_markers()
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, message in enumerate(messages):
            content = message["content"]
            if message["role"] != "assistant":
                found = full.find(content, cursor) if content else -1
                cursor = found + len(content) if found >= 0 else cursor  # a template may drop or rewrite it
                continue
            start = self._find_reply(full, content, cursor, header)
            if start < 0 and content.strip() != content:
                content = content.strip()
                start = self._find_reply(full, content, cursor, header)
            if start < 0:
                raise RowProblem(f"the chat template does not show assistant message {i + 1} verbatim")
            end = start + len(content)
            opened = full.rfind(header, cursor, start) if header else -1
            if opened >= 0:
                start = opened + len(header)
            if closing and full.startswith(closing, end):
                end += len(closing)
            spans.append((start, end))
            cursor = end
        return Rendered(full, tuple(spans), templated=True, eos_loss=False)

    @staticmethod
    def _find_reply(full: str, content: str, cursor: int, header: str) -> int:
        """Where `content` starts as a reply: the first occurrence after `cursor` with a generation prompt between
        (any occurrence when the template has no generation prompt)."""
        found = full.find(content, cursor)
        while header and found >= 0 and full.rfind(header, cursor, found) < 0:
            found = full.find(content, found + 1)
        return found

    def _template_markers(self) -> tuple[str, str]:
        """(generation prompt, closing marker) of the chat template, from a probe conversation; empty strings where
        the template shows neither."""
        if self._markers is None:
            user = [{"role": "user", "content": PROBE_USER}]
            try:
                asked = self._apply_template(user, add_generation_prompt=True)
                plain = self._apply_template(user)
                replied = self._apply_template([*user, {"role": "assistant", "content": PROBE_REPLY}])
            except RowProblem:
                self._markers = ("", "")
                return self._markers
            header = asked[len(plain):] if asked.startswith(plain) else ""
            after = replied.rfind(PROBE_REPLY)
            closing = replied[after + len(PROBE_REPLY):].rstrip() if after >= 0 else ""
            self._markers = (header, closing)
        return self._markers


def chat_prompt(tokenizer: Any, prompt: str) -> str | None:
    """`prompt` as the user turn of the tokenizer's chat template with the assistant's turn opened: the text a chat
    model continues with its answer. None for a tokenizer without a chat template; DataError when the template
    rejects a conversation of one user turn."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - templates raise jinja errors of their own (e.g. role order)
        raise DataError(f"the chat template rejects a lone user prompt: {first_line(exc)}") from exc


def prompt_inputs(tokenizer: Any, prompt: str, *, raw: bool = False) -> Any:
    """Token ids and attention mask (1×n torch tensors) to generate an answer from: the prompt wrapped by
    `chat_prompt`, its special tokens written by the template (none added, as apply_chat_template tokenizes);
    with `raw`, or without a template, the prompt as plain text with the tokenizer's usual special tokens."""
    text = None if raw else chat_prompt(tokenizer, prompt)
    if text is None:
        return tokenizer(prompt, return_tensors="pt")
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")


def plain_instruction_prompt(prompt: str, extra: str = "") -> str:
    """The plain template up to where the response starts (used when a tokenizer has no chat template)."""
    head = PLAIN_INSTRUCTION.format(prompt=prompt)
    if extra.strip():
        head += PLAIN_INPUT.format(input=extra)
    return head + PLAIN_RESPONSE
