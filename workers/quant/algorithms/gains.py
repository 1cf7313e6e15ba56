"""Input-channel gains: once a group of linears is quantized, one float factor per input channel, solved by least squares.

Data flow: the quantized weights Q [N, K] of the linears that read one input x [tokens, K] (their
rows stacked: q/k/v, or gate/up), their float weights W, and calibrate.py's `Hessian` of x:
H = X^T X (scaled) and, with GPTAQ, X~^T X = H + dXXT (x~ the float model's input). A gain a [K]
scales the input: the output Q diag(a) x should match W x~. The error sum_t |Q diag(a) x_t - W x~_t|^2
is a quadratic in a with matrix (Q^T Q) o H (Hadamard product) and linear term
b_j = sum_n Q_nj (W C)_nj, C = X~^T X — one [K, K] solve, no pass over the tokens.
The caller folds a where it costs nothing: into the RMSNorm weight that produces x (gamma * a), or into
the output rows of the quantized linear before (down_proj's input is up_proj's output times
silu(gate): up's scales and mins times a, codes unchanged). Quantization shrinks or grows each input's
effective weight a little (clipping, rounding); the gains undo the part shared by all rows.
"""

from __future__ import annotations

import torch

RIDGE = 1e-6  # relative to the diagonal: a channel with no signal keeps gain 1


def channel_gains(quantized: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor,
                  cross: torch.Tensor | None = None) -> torch.Tensor:
    """quantized, weight [N, K] (dequantized and float), hessian [K, K], cross [K, K] (X~^T X; default
    hessian) -> gains a [K] float32 minimising |Q diag(a) X^T - W X~^T|^2."""
    q = quantized.detach().float()
    w = weight.detach().float()
    h = hessian.detach().float()
    c = h if cross is None else cross.detach().float()
    m = (q.T @ q) * h  # [K, K]
    b = (q * (w @ c)).sum(dim=0)  # [K]
    ridge = RIDGE * torch.diagonal(m) + 1e-12
    gains = torch.linalg.solve(m + torch.diag(ridge), b + ridge)
    return torch.where(torch.isfinite(gains) & (gains > 0), gains, torch.ones_like(gains))
