"""`lrc eval`'s records as one table: a row per model, columns for parameters, held-out loss and perplexity,
and each task's acc / acc_norm. Plain text for the terminal, Markdown for reports; JSON is the records."""

from __future__ import annotations

from tabulate import tabulate


def columns(records: list[dict]) -> list[tuple[str, str | None, str]]:
    """(header, task or None, key) of every column some record has, in a fixed order."""
    cols: list[tuple[str, str | None, str]] = [("model", None, "model"), ("parameters", None, "parameters")]
    if any("loss" in r for r in records):
        # chat rows scored on the assistant's tokens only (every record has the same targets): say so
        loss = "loss (assistant)" if any(r.get("targets") == "assistant" for r in records) else "loss"
        cols += [(loss, None, "loss"), ("ppl", None, "perplexity")]
    tasks: dict[str, list[str]] = {}
    for r in records:
        for task, metrics in r.get("tasks", {}).items():
            have = tasks.setdefault(task, [])
            have += [m for m in ("acc", "acc_norm") if m in metrics and m not in have]
    for task, metrics in tasks.items():
        cols += [(f"{task} {m}", task, m) for m in metrics]
    return cols


def _cell(record: dict, task: str | None, key: str) -> str:
    value = record.get("tasks", {}).get(task, {}).get(key) if task else record.get(key)
    if value is None:
        return "-"
    if key == "parameters":
        return f"{value:,}"
    if key == "model":
        return str(value)
    if key == "perplexity":
        return f"{value:.2f}"
    return f"{value:.4f}"


def rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = columns(records)
    return [c[0] for c in cols], [[_cell(r, task, key) for _, task, key in cols] for r in records]


def format_text(records: list[dict]) -> str:
    header, body = rows(records)
    # the model's name left-aligned, numbers right-aligned
    return tabulate(body, headers=header, tablefmt="simple", disable_numparse=True,
                    colalign=("left", *["right"] * (len(header) - 1)))


def format_markdown(records: list[dict]) -> str:
    header, body = rows(records)
    return tabulate(body, headers=header, tablefmt="pipe", disable_numparse=True,
                    colalign=("left", *["right"] * (len(header) - 1))) + "\n"
