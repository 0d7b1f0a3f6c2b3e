"""Sample generations: greedy answers to a few prompts of the data, which `finetune` prints before and after
training (`output.sample_prompts`), kept apart from the recipe runner."""


SAMPLE_MAX_NEW_TOKENS = 48


def sample_prompts(dataset, n: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference answer ids) of the first `n` rows that have a prompt, read from the loss mask."""
    if n == 0:
        return []
    mask_col = next((c for c in ("assistant_masks", "completion_mask") if c in dataset.column_names), None)
    if mask_col is None:
        return []  # plain text has no prompt to answer
    prompts = []
    for row in dataset.select(range(min(len(dataset), 20 * n))):
        start = row[mask_col].index(1)
        stop = start + next((i for i, m in enumerate(row[mask_col][start:]) if not m), len(row[mask_col]) - start)
        prompts.append((row["input_ids"][:start], row["input_ids"][start:stop]))
        if len(prompts) == n:
            break
    return prompts


def generate(model, tokenizer, prompts: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy answers: (prompt, reference, generated) ids per prompt. Leaves the model in train mode."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    with torch.no_grad():
        for prompt, reference in prompts:
            ids = torch.tensor([prompt], device=device)
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=SAMPLE_MAX_NEW_TOKENS,
                do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            outputs.append((prompt, reference, gen[0, len(prompt):].tolist()))
    model.train(was_training)
    return outputs


def format_samples(samples, tokenizer) -> str:
    def text(ids):
        return tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " | ")

    return "\n".join(
        f"  prompt:    {text(p)}\n  expected:  {text(r)}\n  generated: {text(g)}" for p, r, g in samples
    )
