"""`moetune data RECIPE`: the data report and a few tokenized samples with the loss mask shown, without loading
the model's weights (the tokenizer only). The samples are exactly what training sees: the same tokenized rows
(and cache) as `moetune train`."""

from pathlib import Path

from moetune.config import Recipe, load_recipe


MASK_COLUMNS = ("assistant_masks", "completion_mask")
OPEN, CLOSE = "[[", "]]"  # trained tokens in plain text
ANSI_ON, ANSI_OFF = "\033[1;32m", "\033[0m"  # trained tokens on a terminal: bold green


def describe_data(recipe: "Recipe | dict | str | Path", *, overrides=(), show: int = 3, color: bool = False) -> str:
    """The per-split report (rows read, malformed, too long, token counts, length percentiles) and `show`
    tokenized train samples with the trained tokens marked (`[[...]]`, or bold green ANSI when `color`)."""
    from moetune.data import load_datasets
    from moetune.loading import load_tokenizer

    recipe = load_recipe(recipe, overrides)
    tokenizer = load_tokenizer(recipe.model)
    data = load_datasets(recipe.data, tokenizer)
    lines = []
    for rep in data.report.splits.values():
        lines.append(rep.format_text())
        lines.extend(f"  warning    {w}" for w in rep.warnings)
        lines.append(format_lengths(rep, recipe.data.max_length))
    train = data.train
    mask_col = next((c for c in MASK_COLUMNS if c in train.column_names), None)
    how = ("bold green" if color else f"in {OPEN}...{CLOSE}") if mask_col else "all of them (no mask: every token)"
    for i in range(min(show, len(train))):
        row = train[i]
        mask = row[mask_col] if mask_col else [1] * len(row["input_ids"])
        lines += ["", f"--- train sample {i + 1} of {len(train)}: {len(row['input_ids'])} tokens, {sum(mask)} trained "
                  f"({how})", render_sample(tokenizer, row["input_ids"], mask, color=color).rstrip("\n")]
    return "\n".join(lines)


def format_lengths(rep, max_length: int) -> str:
    lengths = rep.lengths
    share = f" ({rep.trained_tokens / rep.tokens:.0%})" if rep.tokens else ""
    return (f"  tokens per row: p50 {lengths.get('p50')}, p90 {lengths.get('p90')}, p99 {lengths.get('p99')}, "
            f"max {lengths.get('max')} (max_length {max_length}); trained tokens {rep.trained_tokens}{share}"
            + ("; from the cache" if rep.cached else ""))


def render_sample(tokenizer, ids: list[int], mask: list[int], *, color: bool = False) -> str:
    """The decoded row, each run of trained tokens wrapped in `[[...]]` (or colored)."""
    out, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = tokenizer.decode(ids[start:end])
            if mask[start]:
                text = f"{ANSI_ON}{text}{ANSI_OFF}" if color else f"{OPEN}{text}{CLOSE}"
            out.append(text)
            start = end
    return "".join(out)
