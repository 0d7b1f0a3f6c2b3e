"""One forward + backward with everything a path-equivalence test compares: logits, the input gradient and every
trainable parameter's gradient."""

import torch


def forward_backward(model, ids: torch.Tensor):
    """(logits, d(loss)/d(input embeddings), {name: grad} of every trainable parameter); grads are cleared after."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), embeds.grad, grads
