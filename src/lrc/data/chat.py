"""Chat rows (``{"role", "content"}`` or ShareGPT's ``{"from", "value"}`` turns) -> token ids with the chat
template (the tokenizer's own or ``--chat-template FILE``), encoded without special tokens as
``apply_chat_template`` does, plus an EOS unless the rendering ends with one, like every packed document.

``--train-on assistant`` keeps only the assistant's tokens as targets, found by rendering prefixes: turn i's
text is what ``messages[:i+1]`` adds to ``messages[:i]`` rendered with the generation prompt, so the role
header is not a target and the end-of-turn marker is; the fast tokenizer's offsets map those character spans
onto tokens. transformers' ``return_assistant_tokens_mask`` would need ``{% generation %}`` tags, which most
published templates lack; a template that rewrites earlier turns is refused with a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lrc.errors import UserError

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant",
                   "system": "system", "tool": "tool"}


ROLES = ("system", "user", "assistant", "tool")
# Which roles may follow each (None: the start): an optional system turn first, then user and assistant
# alternating from the user's, tool results only after an assistant turn (or another tool result).
_MAY_FOLLOW = {None: {"system", "user"}, "system": {"user"}, "user": {"assistant"},
               "assistant": {"user", "tool"}, "tool": {"tool", "assistant"}}


def _a(name: str) -> str:
    return f"{'an' if name[:1] in 'aeio' else 'a'} {name}"  # a user, a str, an int


def _turn(turn: Any) -> tuple[Any, Any, str, str]:
    """(role, content, role key, content key) of a turn in either layout."""
    if "role" in turn or "content" in turn:
        return turn.get("role"), turn.get("content"), "role", "content"
    return turn.get("from"), turn.get("value"), "from", "value"


def conversation_problem(messages: Any) -> str | None:
    """What is wrong with one chat row, in a few words (None: nothing): its type, an empty conversation, a turn
    without a string role or content, an unknown role, or roles out of order (see `_MAY_FOLLOW`)."""
    if not isinstance(messages, (list, tuple)):
        return f"its conversation is {_a(type(messages).__name__)}, not a list of turns"
    if not messages:
        return "its conversation is empty (no turns)"
    previous = None
    for number, turn in enumerate(messages, start=1):
        if not isinstance(turn, dict):
            return f"turn {number} is {_a(type(turn).__name__)}, not an object with role and content"
        role, content, role_key, content_key = _turn(turn)
        if role is None or content is None:
            missing = role_key if role is None else content_key
            return (f"turn {number} has no '{missing}' (keys: {', '.join(k for k in turn if turn[k] is not None)}); "
                    "use the messages [{role, content}] or ShareGPT [{from, value}] layout")
        if not isinstance(role, str) or not isinstance(content, str):
            bad, value = (role_key, role) if not isinstance(role, str) else (content_key, content)
            return f"turn {number}'s '{bad}' is {_a(type(value).__name__)}, not text"
        role = _SHAREGPT_ROLES.get(role.lower(), role)
        if role not in ROLES:
            return f"turn {number} has role '{role}'; roles are {', '.join(ROLES)} (ShareGPT: human, gpt)"
        if role not in _MAY_FOLLOW[previous]:
            after = f"after {_a(previous)} turn" if previous else "first"
            return (f"its roles are out of order: turn {number} is {_a(role)} turn {after} (expected "
                    f"{' or '.join(sorted(_MAY_FOLLOW[previous]))})")
        previous = role
    return None


def normalise(messages: list[dict]) -> list[dict[str, str]]:
    """Turns of either layout as [{role, content}] (rows are checked by `conversation_problem` first)."""
    out = []
    for turn in messages:
        role, content, _, _ = _turn(turn)
        out.append({"role": _SHAREGPT_ROLES.get(str(role).lower(), str(role)), "content": str(content)})
    return out


def read_template(tokenizer: Any, path: str | None) -> str:
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--chat-template {path} does not exist; pass a Jinja template file")
        return p.read_text(encoding="utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise UserError("the data holds chat rows (messages) but the teacher's tokenizer has no chat template; "
                        "pass --chat-template FILE (a Jinja template)")
    return str(template)


class ChatRenderer:
    """Renders one conversation to (ids, mask); picklable, so `datasets` worker processes can run it."""

    def __init__(self, tokenizer: Any, template: str, train_on: str, eos_id: int):
        self.tokenizer, self.template, self.train_on, self.eos_id = tokenizer, template, train_on, eos_id

    def _text(self, messages: list[dict], generation_prompt: bool = False) -> str:
        # a template's raise_exception() raises jinja2's TemplateError (`Tokenise` names the row)
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        turns = normalise(messages)
        text = self._text(turns)
        spans = self._assistant_spans(turns, text) if self.train_on == "assistant" else []
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(spans), verbose=False)
        ids = list(enc["input_ids"])
        if spans:
            mask = [int(any(a < e and s < b for a, b in spans)) for s, e in enc["offset_mapping"]]
        else:
            mask = [int(self.train_on == "all")] * len(ids)
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
            mask.append(mask[-1] if mask else 0)  # the EOS after an assistant's last turn is its target too
        return ids, mask

    def _assistant_spans(self, turns: list[dict], text: str) -> list[tuple[int, int]]:
        spans = []
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = self._text(turns[:i], generation_prompt=True) if i else ""
            upto = self._text(turns[:i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise UserError("the chat template renders a conversation's beginning differently from the whole "
                                "conversation, so --train-on assistant cannot find the assistant's tokens; use "
                                "--train-on all or pass --chat-template FILE")
            spans.append((len(before), len(upto)))
        return spans
