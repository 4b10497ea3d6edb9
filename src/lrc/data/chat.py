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


def normalise(messages: list[dict]) -> list[dict[str, str]]:
    out = []
    for turn in messages:
        if turn.get("role") is not None:
            out.append({"role": str(turn["role"]), "content": str(turn.get("content") or "")})
        elif turn.get("from") is not None:
            role = _SHAREGPT_ROLES.get(str(turn["from"]).lower(), str(turn["from"]))
            out.append({"role": role, "content": str(turn.get("value") or "")})
        else:
            raise UserError(f"a chat turn has neither role/content nor from/value keys (keys: {', '.join(turn)}); "
                            "use the messages [{role, content}] or ShareGPT [{from, value}] layout")
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
