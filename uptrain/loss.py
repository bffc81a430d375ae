"""The training losses: per-token cross-entropy and distillation KL from logits, and the same from final hidden
states in token chunks (or through Liger Kernel), where no (tokens, vocab) logits tensor outlives its chunk.

For a 128k vocabulary at 4 x 2048 tokens, full fp32 logits are 4.2 GB per copy, and the plain path holds the
student's, the teacher's and their log-softmaxes at once. Here the lm_head runs on ``chunk`` tokens at a time
(512 by default: a few (512, vocab) float32 buffers, 263 MB each at 128k);
each chunk's loss and its gradient with respect to the chunk's logits are computed in the forward pass, turned
at once into gradients for the hidden states and the lm_head weight (and bias), and only those are kept
(tokens x hidden and vocab x hidden). The backward pass scales them by the incoming gradient. Peak memory: one
chunk of logits (student and teacher) plus the two gradient buffers.

Per token with a label (every position but each block's last), as ``token_losses`` and ``distill_kl`` define the loss:
    loss = (1 - w) * CE(z, y) + w * T^2 * KL(softmax(t / T) || softmax(z / T))
    dloss/dz = (1 - w) * (softmax(z) - onehot(y)) + w * T * (softmax(z / T) - softmax(t / T))
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from uptrain.errors import RecipeError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel

    from uptrain.adapters import Student

SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # gemma2, cohere, granite


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of a (B, T) block: positions 0..T-2 predict 1..T-1.

    The labels are shifted (and the last position ignored) rather than the logits sliced, which
    would copy a (B, T, vocab) tensor.
    """
    labels = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # (B, T)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed per-token KL(teacher || student) of the softened distributions, times T^2 (Hinton et al.)."""
    s = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum() * temperature**2


@dataclass(frozen=True)
class Stored:
    """An offline teacher's distribution per token of a micro-batch (B*T rows, ``uptrain.teacher.Targets``): the
    ids of its top k tokens (None: the whole vocabulary in order), their log-probs at the distillation
    temperature, and the log of the probability outside them."""

    ids: torch.Tensor | None
    logprobs: torch.Tensor
    tail: torch.Tensor

    def rows(self, rows: slice, keep: torch.Tensor) -> Stored:
        """The distribution of rows ``rows`` that ``keep`` selects (a chunk's labelled tokens)."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t[rows][keep]

        return Stored(None if self.ids is None else pick(self.ids), pick(self.logprobs), pick(self.tail))


def stored_kl(log_q: torch.Tensor, stored: Stored) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed KL, the student's target distribution) of tokens against an offline teacher's top-k distribution.

    The KL is taken between the two distributions coarsened to k + 1 outcomes: the teacher's k stored tokens, and
    "the rest", which holds the teacher's tail mass p_r and the student's mass q_r outside those tokens:

        KL = sum_i p_i (log p_i - log q_i) + p_r (log p_r - log q_r)

    This is top-k sparse knowledge distillation with the remaining mass kept as one extra outcome, the form
    sometimes called top-k with a residual (or "other") bucket: exact for what the files hold, never more than
    the full KL (coarsening only loses information), and the full KL itself when k is the whole vocabulary
    (p_r = 0). Renormalizing the top k instead would ask the student to put all its mass there. Its gradient
    with respect to the student's tempered logits is q - target, where the target is p_i on the stored tokens and
    q_j * p_r / q_r on every other token (the teacher's tail spread as the student spreads its own).
    """
    log_p = stored.logprobs.float()
    p = log_p.exp()
    if stored.ids is None:
        return torch.where(p > 0, p * (log_p - log_q), 0).sum(), p
    log_q_top = log_q.gather(1, stored.ids)
    log_q_rest = log_q.scatter(1, stored.ids, float("-inf")).logsumexp(1)  # (n,)
    tail = stored.tail.float()
    p_rest = tail.exp()
    kl = torch.where(p > 0, p * (log_p - log_q_top), 0).sum()
    kl = kl + torch.where(p_rest > 0, p_rest * (tail - log_q_rest), 0).sum()
    target = (log_q + (tail - log_q_rest)[:, None]).exp()
    return kl, target.scatter_(1, stored.ids, p)


def stored_distill_kl(student_logits: torch.Tensor, stored: Stored, temperature: float) -> torch.Tensor:
    """``distill_kl`` against an offline teacher's stored distribution (``stored_kl``), from full (B, T, vocab)
    logits, through autograd."""
    flat = student_logits.flatten(0, 1).float() / temperature
    keep = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
    keep.view(student_logits.shape[:2])[:, -1] = False  # the last position predicts nothing
    kl, _ = stored_kl(flat[keep].log_softmax(-1), stored.rows(slice(None), keep))
    return kl * temperature**2


def chunkable(model: Student) -> bool:
    """Whether logits are exactly lm_head(final hidden state): no softcapping or scaling after the lm_head."""
    config = model.config
    return all(getattr(config, key, None) in (None, 1.0) for key in SCALED_LOGITS)


def loss_chunk(
    chunk_tokens: int, accelerator: Accelerator, model: torch.nn.Module, teacher: PreTrainedModel | None
) -> int:
    """Tokens per loss chunk (``train.loss_chunk_tokens``), or 0 for the full-logits path: when the recipe asks
    for it, under FSDP (whose sharded lm_head weight the chunked loss cannot read) and where logits are scaled
    after the lm_head."""
    from accelerate.utils import DistributedType

    models = [accelerator.unwrap_model(model)] + ([teacher] if teacher is not None else [])
    if accelerator.distributed_type == DistributedType.FSDP or not all(chunkable(m) for m in models):
        return 0
    return chunk_tokens


def online_kl(
    log_ps: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) summed over rows, and the teacher's probabilities: the chunked loss's online term.

    ``log_ps`` (n, V) are the student's log-probabilities at ``temperature``; ``teacher_hidden`` (n, H) the
    teacher's final hidden states of the same rows, projected here by its lm_head.
    """
    bias = None if teacher_bias is None else teacher_bias.to(teacher_hidden.dtype)
    t = F.linear(teacher_hidden, teacher_weight.to(teacher_hidden.dtype), bias).float()  # (n, V)
    log_pt = (t / temperature).log_softmax(-1)
    del t
    p_t = log_pt.exp()
    return (p_t * (log_pt - log_ps)).sum(), p_t


class ChunkedLoss(torch.autograd.Function):
    """Summed (1 - w) CE + w T^2 KL over chunks; returns (loss, CE) sums, differentiable in hidden, weight, bias."""

    @staticmethod
    def forward(
        ctx: Any,  # autograd's context, as torch types it: forward keeps its own attributes on it for backward
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        teacher_hidden: torch.Tensor | None,
        teacher_weight: torch.Tensor | None,
        teacher_bias: torch.Tensor | None,
        w: float,
        temperature: float,
        chunk: int,
        stored: Stored | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        # A frozen lm_head (adapters, trainable subsets) gets no (vocab, H) gradient buffer.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = None if bias is None or not ctx.needs_input_grad[2] else torch.zeros_like(bias, dtype=torch.float32)
        loss = hidden.new_zeros((), dtype=torch.float32)
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            keep = labels[rows] != -100
            if not keep.any():
                continue
            h, y = hidden[rows][keep], labels[rows][keep]  # (n, H), (n,)
            # A 16-bit weight (frozen, under autocast) multiplies in its own dtype: no float32 copy of (V, H).
            mm = weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else h.dtype
            z = F.linear(h.to(mm), weight.to(mm), None if bias is None else bias.to(mm)).float()  # (n, V)
            log_ps = (z / temperature).log_softmax(-1) if w > 0 else None  # before z becomes log_p in place
            log_p = z.log_softmax(-1)
            del z
            ce = -log_p.gather(1, y[:, None]).sum()
            dz = log_p.exp_()  # in place: each (n, V) buffer counts at this vocabulary size
            dz[torch.arange(len(y)), y] -= 1
            dz *= 1 - w
            chunk_loss = (1 - w) * ce
            if log_ps is not None:  # w > 0: the offline teacher's stored distribution, or the teacher's logits here
                if stored is not None:
                    kl, target = stored_kl(log_ps, stored.rows(rows, keep))
                else:
                    assert teacher_hidden is not None and teacher_weight is not None, "no teacher to distil"
                    kl, target = online_kl(
                        log_ps, teacher_hidden[rows][keep], teacher_weight, teacher_bias, temperature
                    )
                chunk_loss = chunk_loss + w * temperature**2 * kl
                dz += log_ps.exp_().sub_(target).mul_(w * temperature)
            loss += chunk_loss
            ce_sum += ce
            grad_hidden[start : start + chunk][keep] = (dz.to(mm) @ weight.to(mm)).float()  # (n, H)
            if grad_weight is not None:
                grad_weight += dz.T @ h.float()  # (V, H)
            if grad_bias is not None:
                grad_bias += dz.sum(0)
        ctx.save_for_backward(grad_hidden, *(t for t in (grad_weight, grad_bias) if t is not None))
        ctx.has_weight, ctx.has_bias, ctx.hidden_dtype = grad_weight is not None, grad_bias is not None, hidden.dtype
        ctx.mark_non_differentiable(ce_sum)
        return loss, ce_sum

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_ce: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, *rest = ctx.saved_tensors
        grad_weight = rest.pop(0) if ctx.has_weight else None
        grad_bias = rest.pop(0) if ctx.has_bias else None
        scale = grad_loss.float()
        return (
            (grad_hidden * scale).to(ctx.hidden_dtype),
            None if grad_weight is None else grad_weight * scale,
            None if grad_bias is None else grad_bias * scale,
            *(None,) * 8,
        )


def chunked_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    input_ids: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.nn.Module | None = None,
    weight: float = 0.0,
    temperature: float = 1.0,
    chunk: int = 512,
    stored: Stored | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, CE sum) of a (B, T) block from final hidden states (B, T, H); positions 0..T-2 predict 1..T-1.
    The distillation target is the teacher's hidden states and head, or its ``stored`` distribution."""
    labels = F.pad(input_ids[:, 1:], (0, 1), value=-100).flatten()  # (B*T,)
    flat = hidden.flatten(0, 1)  # (B*T, H)
    t_flat = None if teacher_hidden is None else teacher_hidden.flatten(0, 1)
    t_weight = None if teacher_head is None else teacher_head.weight
    t_bias = None if teacher_head is None else teacher_head.bias
    return ChunkedLoss.apply(
        flat, lm_head.weight, lm_head.bias, labels, t_flat, t_weight, t_bias, weight, temperature, chunk, stored
    )


def liger_available() -> bool:
    """Whether Liger Kernel (``pip install liger-kernel``: Triton kernels, CUDA only) can be imported."""
    return importlib.util.find_spec("liger_kernel") is not None


def select_fused_loss(
    option: str, device_type: str, biased_distill: bool, available: bool | None = None, offline: bool = False
) -> str:
    """``"liger"`` or ``"chunked"`` for ``train.fused_loss`` (auto | liger | off) on ``device_type``.

    auto takes Liger where it can run (installed, CUDA, and no lm_head bias under distillation: its fused JSD
    has no bias argument); liger insists and says in one line why it cannot run; off is the chunked loss.
    """
    available = liger_available() if available is None else available
    if option == "liger":
        if not available:
            raise RecipeError(
                "train.fused_loss: liger needs Liger Kernel: `pip install liger-kernel` (CUDA only), "
                "or set train.fused_loss=auto"
            )
        if device_type != "cuda":
            raise RecipeError(
                f"train.fused_loss: liger runs on CUDA only; this run is on {device_type} (set train.fused_loss=auto)"
            )
        if biased_distill:
            raise RecipeError(
                "train.fused_loss: Liger's fused JSD has no lm_head bias and this model's lm_head "
                "has one (set train.fused_loss=auto)"
            )
        if offline:
            raise RecipeError(
                "train.fused_loss: Liger has no loss against a stored top-k distribution "
                "(distill.mode: offline); set train.fused_loss=auto"
            )
        return "liger"
    if option == "auto" and available and device_type == "cuda" and not biased_distill and not offline:
        return "liger"
    return "chunked"


def liger_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    input_ids: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.nn.Module | None = None,
    weight: float = 0.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked_loss`` through Liger Kernel's fused linear cross-entropy and fused linear JSD (NOT yet run on a GPU).

    Semantics read from liger-kernel 0.8.2's source (ops/fused_linear_cross_entropy.py, ops/fused_linear_jsd.py,
    ops/jsd.py): the CE takes ``reduction="sum"``; the JSD at ``jsd_beta=0`` is the forward KL(teacher ||
    student) of the temperature-softened distributions, summed over the vocabulary and divided by the labelled
    token count, without the T^2 factor. So the KL sum here is that value times the labelled tokens times T^2.
    The student's lm_head matmul runs twice (once per kernel); the JSD kernel takes no bias.
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy, liger_fused_linear_jsd

    labels = F.pad(input_ids[:, 1:], (0, 1), value=-100).flatten()  # (B*T,)
    flat = hidden.flatten(0, 1)  # (B*T, H)
    head_weight = lm_head.weight.to(flat.dtype)
    bias = None if lm_head.bias is None else lm_head.bias.to(flat.dtype)
    ce = liger_fused_linear_cross_entropy(flat, head_weight, labels, bias=bias, ignore_index=-100, reduction="sum")
    if weight == 0:
        return ce, ce.detach()
    assert teacher_hidden is not None and teacher_head is not None, "distillation needs the teacher's states and head"
    t_flat = teacher_hidden.flatten(0, 1)
    kl_mean = liger_fused_linear_jsd(
        flat,
        head_weight,
        t_flat,
        teacher_head.weight.to(t_flat.dtype),
        shift_labels=labels,
        jsd_beta=0.0,
        ignore_index=-100,
        temperature=temperature,
    )
    kl = kl_mean * (labels != -100).sum() * temperature**2
    return (1 - weight) * ce + weight * kl, ce.detach()
