"""What the path-equivalence tests share: LoRA weights set to random values (PEFT zero-initializes B, which would
hide a mispaired expert) and one forward + backward with everything they compare."""

import torch


def forward_backward(model, ids: torch.Tensor):
    """(logits, d(loss)/d(input embeddings), {name: grad} of every trainable parameter); grads are cleared after."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), embeds.grad, grads


def randomize_lora(model, seed: int = 0) -> None:
    """Every LoRA A and B (attention and expert ones) drawn from N(0, 0.1^2), seeded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def assert_same_step(model, ids: torch.Tensor, switch, close) -> None:
    """One forward + backward, `switch(model)` (to the reference path), another: the logits, the input gradient and
    every trainable parameter's gradient (each non-zero) agree under `close(actual, expected)`."""
    logits, d_embeds, grads = forward_backward(model, ids)
    switch(model)
    ref_logits, ref_d_embeds, ref_grads = forward_backward(model, ids)
    close(logits, ref_logits)
    close(d_embeds, ref_d_embeds)
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        assert ref.abs().sum() > 0, name
        close(grads[name], ref)
