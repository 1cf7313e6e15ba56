"""Scale refit: once a weight's codes are fixed, each group's scale re-solved by least squares on the output error.

Data flow: a `GroupedWeight` (codes q, integer zero points z, scales s per group) from GPTQ,
RTN or AWQ, the float weight w [N, K] it approximates and its input second moment H [K, K]
(calibrate.py's `Hessian`). With q and z fixed, row r's dequantized weight is linear in its
scales: w^_r = sum_g s_rg u_r|g, u = q - z restricted to group g's columns. Its output error
(w_r - w^_r) H (w_r - w^_r)^T over every group at once (GPTQ's rounding makes the groups'
errors correlated: the full H, not its diagonal blocks) is a quadratic in the G scales of the row,
solved exactly as a [G, G] system per row — batched torch.linalg.solve. With `cross` (GPTAQ) the
target is the float model's output: the linear term uses w (H + alpha dXXT) instead of w H.
Zero points stay integers (the GPTQ / AWQ layouts store 4-bit zeros); scales are rounded to fp16
as the checkpoints store them; a row keeps its old scales unless the new ones lower its error.
"""

from __future__ import annotations

import torch
from shardserve.workers.quant.weights import GroupedWeight

RIDGE = 1e-6  # relative to each group's own curvature: keeps groups with no signal at their old scale


def refit_scales(weight: GroupedWeight, w: torch.Tensor, hessian: torch.Tensor,
                 cross: torch.Tensor | None = None) -> GroupedWeight:
    """weight: codes / zeros / scales to refit; w [N, K] the float weight and hessian [K, K] its input
    second moment, both in the checkpoint's input order; cross [K, K]: the linear term's matrix
    (default hessian). Returns a GroupedWeight with the same codes, zeros and perm."""
    n, k = weight.q.shape
    g = weight.group_size
    num_groups = weight.scales.shape[1]
    h = hessian.detach().float()
    c = h if cross is None else cross.detach().float()
    w = w.detach().float()
    if weight.perm is not None:  # work in the codes' column order
        w, h, c = w[:, weight.perm], h[weight.perm][:, weight.perm], c[weight.perm][:, weight.perm]
    old = weight.scales.float()
    zeros = torch.round(-weight.mins / torch.where(old == 0, torch.ones_like(old), old))  # [N, G]
    group_of = torch.arange(k) // g  # [K]
    u = weight.q.float() - zeros[:, group_of]  # [N, K]
    onehot = torch.nn.functional.one_hot(group_of, num_groups).float()  # [K, G]
    # row r's dequantized weight is sum_g s_rg u_r|g; curvature[r, g] = u_r|g H, one [N, g] @ [g, K] per group
    curvature = torch.stack([u[:, i * g:(i + 1) * g] @ h[i * g:(i + 1) * g] for i in range(num_groups)], dim=1)
    m = (curvature * u[:, None, :]) @ onehot  # [N, G, G]: u_r|g H u_r|g'^T
    b = ((w @ c) * u) @ onehot  # [N, G]
    ridge = RIDGE * torch.diagonal(m, dim1=1, dim2=2) + 1e-12  # [N, G]
    m = m + torch.diag_embed(ridge)
    new = torch.linalg.solve(m, (b + ridge * old).unsqueeze(-1)).squeeze(-1)  # [N, G]
    new = torch.where(new > 0, new, old).half().float().clamp(min=2**-24)

    def loss(scales: torch.Tensor) -> torch.Tensor:  # per row, up to the constant w H w^T
        w_hat = scales[:, group_of] * u
        return ((w_hat @ h) * w_hat).sum(dim=1) - 2 * ((w @ c) * w_hat).sum(dim=1)

    better = (loss(new) < loss(old))[:, None]
    scales = torch.where(better, new, old)
    return GroupedWeight(q=weight.q, scales=scales, mins=-zeros * scales, group_size=g, perm=weight.perm,
                         bits=weight.bits)
