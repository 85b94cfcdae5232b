"""Cross-entropy over every item without holding the full logits.

``linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy(hidden @ weight.T (+ bias), targets)`` (mean over the rows), values and
gradients, up to float rounding. It walks the rows in chunks: for each chunk it computes
the logits, their log-softmax, the loss and, in the same pass, the gradients of the loss
with respect to ``hidden``, ``weight`` and ``bias`` (softmax minus one-hot, times the
inputs), then drops the chunk's logits. Backward only scales the stored gradients.

On this project's 2-core CPU a batch of 2,048 targets over Food-Kitchen's 36,299 items
costs about 0.5 s, steadily; logits + ``F.cross_entropy`` + autograd allocate several
[2048, 36299] tensors (297 MB each) per step and take 0.4 to 2 s per step depending on
the allocator (``benchmarks/train_speed.py`` prints both per model as the "loss head").
The peak memory of the head falls to one [chunk, items] block.
"""

import torch

DEFAULT_CHUNK = 256


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        n = hidden.size(0)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        want_any = want_h or want_w or want_b
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        grad_b = torch.zeros_like(bias) if (want_b and bias is not None) else None
        total = hidden.new_zeros((), dtype=torch.float64)
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk]
            t = targets[s : s + chunk]
            logits = h @ weight.t()
            if bias is not None:
                logits += bias
            logp = torch.log_softmax(logits, dim=1)
            del logits
            total += -logp.gather(1, t.view(-1, 1)).sum().double()
            if not want_any:
                continue
            p = logp.exp_()  # softmax, in place
            p[torch.arange(len(t), device=p.device), t] -= 1.0  # d(sum of losses)/d logits
            if want_h:
                grad_h[s : s + chunk] = p @ weight
            if want_w:
                grad_w.addmm_(p.t(), h)
            if grad_b is not None:
                grad_b += p.sum(0)
        inv = 1.0 / max(n, 1)
        ctx.inv = inv
        ctx.save_for_backward(
            *(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b))
        )
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        return (total * inv).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        scale = grad_out * ctx.inv
        outs = [g * scale if has else None for g, has in zip(saved, ctx.has)]
        return outs[0], outs[1], outs[2], None, None


def linear_cross_entropy(hidden, weight, targets, bias=None, chunk=DEFAULT_CHUNK):
    """Mean cross-entropy of ``hidden`` [N, H] scored against every row of ``weight``
    [V, H] (plus ``bias`` [V]) with true classes ``targets`` [N] (all valid: select the
    rows that count before calling). Exact as ``F.cross_entropy`` over the full logits."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.size(1) != weight.size(1):
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.size(0)}], got {tuple(targets.shape)}")
    if hidden.size(0) == 0:
        raise ValueError("linear_cross_entropy: no rows to score")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, int(chunk))
