"""Dataset formats: which columns play which role, and how one row becomes text with loss spans, then tokens.

Four formats:
- text: causal LM on a document; every token carries loss.
- instruction: prompt (+ optional input) -> response; loss on the response and its end-of-turn token only. Rendered
  with the tokenizer's chat template when it has one (user turn = prompt + input, assistant turn = response),
  else with a plain "### Instruction / ### Input / ### Response" template ending in the EOS token.
- chat: a list of {role, content} messages (ShareGPT's {from, value} too) rendered with the chat template; loss on
  the assistant turns only.
- classification: text + label; the loss is on the class, not on tokens.

Loss spans are character ranges of the rendered text, found by rendering prefixes of the conversation: the assistant
turn i spans from the end of `render(messages[:i], add_generation_prompt=True)` to the end of
`render(messages[:i+1])`, trailing whitespace excluded. Templates that render earlier turns differently once later
turns exist (Qwen3 drops old reasoning) fail that prefix check; then the turn's content is searched for in the full
text and extended over the closing marker the template puts after it. The whole text is tokenized once and a token
carries loss when its character offsets overlap a loss span, so training sees exactly the tokens that the template
produces in one piece.
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


@dataclass(frozen=True)
class Tokenized:
    """Token ids with, for each, whether it carries loss and the text it stands for (for the preview)."""

    ids: tuple[int, ...]
    loss: tuple[bool, ...]
    pieces: tuple[str, ...]


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


class RowFormatter:
    """Renders and tokenizes rows of one format for one tokenizer."""

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

    # -- rendering ---------------------------------------------------------------------------------------------------
    def render(self, row: Mapping[str, Any]) -> Rendered:
        if self.fmt == "text":
            text = self._text(row, "text")
            return Rendered(text, ((0, len(text)),), templated=False, eos_loss=self.eos_id is not None)
        if self.fmt == "classification":
            return Rendered(self._text(row, "text"), (), templated=False, eos_loss=False, label=self._label(row))
        if self.fmt == "instruction":
            return self._render_instruction(row)
        return self._render_chat(self._messages(row))

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

    def _render_instruction(self, row: Mapping[str, Any]) -> Rendered:
        prompt = self._text(row, "prompt")
        extra = self._text(row, "input", required=False) if "input" in self.columns else ""
        response = self._text(row, "response")
        if self.has_template:
            user = f"{prompt}\n\n{extra}" if extra.strip() else prompt
            return self._render_chat([{"role": "user", "content": user}, {"role": "assistant", "content": response}])
        head = plain_instruction_prompt(prompt, extra)
        return Rendered(head + response, ((len(head), len(head) + len(response)),), templated=False,
                        eos_loss=self.eos_id is not None)

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

    def _apply_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # noqa: BLE001 - templates raise jinja errors of their own (e.g. role order)
            raise RowProblem(f"the chat template rejects this conversation: {first_line(exc)}") from exc

    def _render_chat(self, messages: list[dict[str, str]]) -> Rendered:
        full = self._apply_template(messages, add_generation_prompt=False)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._apply_template(messages[:i], add_generation_prompt=True) if i else ""
            through = self._apply_template(messages[: i + 1], add_generation_prompt=False).rstrip()
            if i and full.startswith(through) and through.startswith(before) and len(before) >= cursor:
                start, end = len(before), len(through)
            else:
                start = full.find(message["content"], cursor)
                if start < 0:
                    raise RowProblem(f"the chat template does not show assistant message {i + 1} verbatim")
                end = start + len(message["content"])
                closing = through[through.rfind(message["content"]) + len(message["content"]):]
                if closing and full.startswith(closing, end):
                    end += len(closing)
            spans.append((start, end))
            cursor = end
        return Rendered(full, tuple(spans), templated=True, eos_loss=False)

    # -- tokenizing --------------------------------------------------------------------------------------------------
    def tokenize(self, rendered: Rendered, max_length: int) -> tuple[Tokenized, int]:
        """The tokens that train (cut to `max_length`) and the untruncated count. Template text already holds its
        special tokens. Classification re-tokenizes with the tokenizer's own truncation so that closing special
        tokens ([SEP]) survive; causal formats keep the first `max_length` tokens."""
        full = self._encode(rendered, None)
        if len(full.ids) <= max_length:
            kept = full
        elif self.fmt == "classification":
            kept = self._encode(rendered, max_length)
        else:
            kept = Tokenized(full.ids[:max_length], full.loss[:max_length], full.pieces[:max_length])
        if self.fmt != "classification" and not any(kept.loss[1:]):  # the first token's label is never predicted
            prompt = full.loss.index(True) if True in full.loss else len(full.ids)
            raise RowProblem(f"no loss token fits in max_length={max_length} (the text before it is {prompt} tokens)")
        return kept, len(full.ids)

    def _encode(self, rendered: Rendered, truncate_to: int | None) -> Tokenized:
        try:
            encoding = self.tokenizer(
                rendered.text, add_special_tokens=not rendered.templated, return_offsets_mapping=True,
                truncation=truncate_to is not None, max_length=truncate_to,
            )
        except NotImplementedError as exc:
            raise DataError(
                "this model's tokenizer cannot map tokens to characters (it is not a 'fast' tokenizer), which loss "
                "masks need: use a model whose folder has a tokenizer.json"
            ) from exc
        ids = list(encoding["input_ids"])
        offsets = list(encoding["offset_mapping"])
        loss = [any(b < end and start < e for start, end in rendered.loss_spans) for b, e in offsets]
        pieces = self._pieces(rendered.text, ids, offsets)
        if rendered.eos_loss and ids and ids[-1] == self.eos_id:
            loss[-1] = True  # the tokenizer appends EOS itself
        elif rendered.eos_loss:
            ids.append(self.eos_id)
            loss.append(True)
            pieces.append(self.tokenizer.decode([self.eos_id]))
        return Tokenized(tuple(ids), tuple(loss), tuple(pieces))

    def _pieces(self, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> list[str]:
        """The text each token stands for. Tokens sharing characters (a UTF-8 character split over bytes) give
        the characters to the first of them; tokens added outside the text (BOS) show their decoded form."""
        pieces = []
        shown = 0
        for token_id, (b, e) in zip(ids, offsets):
            if b == e:
                pieces.append(self.tokenizer.decode([token_id]))
                continue
            pieces.append(text[shown:e] if e > shown else "")
            shown = max(shown, e)
        return pieces


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
