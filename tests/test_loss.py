"""The chunked loss equals the full-logits loss, and so do its gradients, for every parameter (fp32)."""

import pytest
import torch
from tiny import make_model

from uptrain.loss import chunkable, chunked_loss, distill_kl, token_losses


def full_and_chunked(family: str, w: float, temperature: float, chunk: int):
    torch.manual_seed(0)
    student, teacher = make_model(family, 2, seed=0), make_model(family, 2, seed=1)
    ids = torch.randint(3, 96, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t_out = teacher(input_ids=ids, output_hidden_states=True)
    out = student(input_ids=ids)
    full = token_losses(out.logits, ids)
    ce_full = full.detach()
    if w > 0:
        full = (1 - w) * full + w * distill_kl(out.logits, t_out.logits, temperature)
    full.backward()
    grads_full = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    hidden = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    loss, ce = chunked_loss(
        hidden,
        student.get_output_embeddings(),
        ids,
        t_out.hidden_states[-1],
        teacher.get_output_embeddings(),
        w,
        temperature,
        chunk,
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return (full.detach(), ce_full, grads_full), (loss.detach(), ce, grads)


@pytest.mark.parametrize("family", ["llama", "gemma", "phi", "gpt_bigcode"])  # gemma: tied; phi: lm_head bias
@pytest.mark.parametrize("w, temperature, chunk", [(0.0, 1.0, 7), (0.5, 2.0, 5), (1.0, 1.0, 64)])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(family, w, temperature, chunk):
    (full, ce_full, grads_full), (loss, ce, grads) = full_and_chunked(family, w, temperature, chunk)
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ce_full, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_full.keys()
    for name, g in grads_full.items():  # fp32 summation order differs: relative to the gradient's norm
        assert (grads[name] - g).norm() <= 1e-5 * g.norm() + 1e-8, name


def test_scaled_logits_families_fall_back():
    assert chunkable(make_model("llama", 2))
    assert not chunkable(make_model("gemma2", 2))  # final_logit_softcapping
    assert not chunkable(make_model("cohere", 2))  # logit_scale
