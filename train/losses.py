"""DSaH's losses exactly as in the paper (Eq. 5-14, 18) and the DPSH baseline loss.

Pairs: "every two images in the same batch construct an image pair" (sec. 4.3). Every pairwise
sum here runs over the N(N-1)/2 unordered pairs i < j of a batch: a pair is counted once, and
an image is never paired with itself (that would be a norm penalty, not a pair term).

The paper writes ||.||_2 of a scalar in Eq. 6, 7 and 9; taken literally that is its absolute value
(`norm="abs"`), but many hashing papers write ||.||_2 for the squared l2 loss (`norm="square"`),
whose gradient shrinks as a pair nears its target instead of pushing every pair with the same
force. The norm applies to the semantic terms J_sem only: Eq. 9's d_ij stays the absolute error,
because `saliency_loss` compares it with a margin in bits (d = k |...|), which a squared error
would no longer be.
All sums are sums, not means, as the paper writes them; the weights lambda = 30, alpha = 40
(sec. 4.3) and lambda = 60, alpha = 0.01 (Eq. 18) are calibrated against sums.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from dsah_rt.train.models import pm1_from_u

Units = Literal["bits", "unit"]
Norm = Literal["abs", "square", "likelihood"]
# "likelihood" swaps Eq. 6's pair error for DPSH's negative log-likelihood of S_ij (a departure, an
# experiment of issue 8: with many classes most pairs are dissimilar, and Eq. 6 asks each of them for
# u_i.u_j = -k, which no set of more than two codes can satisfy at once).
NORMS: tuple[Norm, ...] = ("abs", "square", "likelihood")

LAMBDA = 30.0
ALPHA = 40.0
SIMULTANEOUS_LAMBDA = 60.0
SIMULTANEOUS_ALPHA = 0.01
# DPSH sums, for each batch image, its likelihood over pairs with all ~5000 training images of
# its CIFAR-10 split against one eta = 10 quantization term. Here each image has N - 1 = 31
# in-batch pairs (batch 32), so the same per-image balance is about 10 * 31 / 5000 = 0.06.
DPSH_ETA = 0.1


def similarity(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """Eq. 5: S_ij = 1 if images i and j are similar, else 0, as a float (Na, Nb) matrix.

    Class ids (N,): similar iff the same class. Multi-hot (N, C): similar iff at least one
    shared label (NUS-WIDE's convention, sec. 4.4).
    """
    if labels_a.dim() != labels_b.dim() or labels_a.dim() not in (1, 2):
        raise ValueError(
            "labels must both be (N,) class ids or (N, C) multi-hot, "
            f"got {tuple(labels_a.shape)} and {tuple(labels_b.shape)}"
        )
    if labels_a.dim() == 1:
        return (labels_a[:, None] == labels_b[None, :]).float()
    return ((labels_a.float() @ labels_b.float().T) > 0).float()


def _pair_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(diagonal=1)


def _pair_distance(u: torch.Tensor, S: torch.Tensor, bits: int, norm: Norm = "abs") -> torch.Tensor:
    """|S_ij - (u_i.u_j + k) / 2k| (or its square) for all i, j: Eq. 6's summand, d_ij of Eq. 9 (abs);
    in [0, 1] for binary codes."""
    if norm not in ("abs", "square"):
        raise ValueError(f"norm must be abs or square, got {norm!r}")
    error = S - (u @ u.T + bits) / (2 * bits)
    return error.abs() if norm == "abs" else error.square()


def semantic_loss(u: torch.Tensor, S: torch.Tensor, bits: int, norm: Norm = "abs") -> torch.Tensor:
    """Eq. 6 (or Eq. 7 with u'): sum over pairs i < j of |S_ij - (u_i.u_j + k) / 2k| (or its square,
    or with `norm="likelihood"` DPSH's pair term)."""
    if norm == "likelihood":
        return _likelihood(u, S)
    return _pair_distance(u, S, bits, norm)[_pair_mask(len(u), u.device)].sum()


def _likelihood(u: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """DPSH's sum over pairs i < j of log(1 + e^theta_ij) - S_ij theta_ij, theta_ij = u_i.u_j / 2.

    log(1 + e^theta) is computed as max(theta, 0) + log1p(e^-|theta|): finite for the large
    |theta| of long codes, and exact where F.softplus switches to the identity (theta > 20).
    """
    theta = (u @ u.T) / 2
    softplus = theta.clamp(min=0) + torch.log1p(torch.exp(-theta.abs()))
    return (softplus - S * theta)[_pair_mask(len(u), u.device)].sum()


def saliency_loss(
    u: torch.Tensor,
    u_sal: torch.Tensor,
    S: torch.Tensor,
    bits: int,
    margin: float | None = None,
    units: Units = "bits",
) -> torch.Tensor:
    """Eq. 9-10: sum over pairs i < j of max(m - d_ij + d'_ij, 0).

    d_ij is the Eq. 9 distance of the original pair (codes u), d'_ij that of the saliency pair
    (codes u'). The margin defaults to the paper's m = k/4 (sec. 4.3).

    units="unit" takes d as the paper writes it, in [0, 1]: then m = k/4 >= 3 exceeds any
    d_ij - d'_ij and the hinge never switches off, so the loss is linear in d' - d.
    units="bits" scales both distances by k (d = k * |...|, roughly a Hamming-distance error),
    on which m = k/4 is a margin that can actually be met.
    """
    if units not in ("bits", "unit"):
        raise ValueError(f"units must be 'bits' or 'unit', got {units!r}")
    m = bits / 4 if margin is None else margin
    scale = bits if units == "bits" else 1
    d = scale * _pair_distance(u, S, bits)
    d_sal = scale * _pair_distance(u_sal, S, bits)
    return F.relu(m - d + d_sal)[_pair_mask(len(u), u.device)].sum()


def quantization_loss(u: torch.Tensor) -> torch.Tensor:
    """Eq. 11 for one set of codes: sum_i ||u_i - b_i||_1, b = +1 where u >= 0 else -1 (Eq. 12).

    b is the minimiser of this term alone and is held fixed while the network steps (it only
    appears here), so no gradient flows through it.
    """
    return (u - pm1_from_u(u).detach()).abs().sum()


@torch.no_grad()
def diagnostics(
    u: torch.Tensor, u_sal: torch.Tensor | None, S: torch.Tensor, bits: int, margin: float | None = None,
    units: Units = "bits",
) -> dict[str, float]:
    """What the terms are doing, for metrics.json: |u| (are codes saturating or exploding?), and
    with u' the mean d and d' of Eq. 9 (in `units`) and the share of pairs whose Eq. 10 hinge is
    active (1.0 = the saliency loss is linear everywhere, 0.0 = it is switched off)."""
    stats = {"u_abs_mean": float(u.abs().mean()), "u_abs_max": float(u.abs().max())}
    if u_sal is None:
        return stats
    pairs = _pair_mask(len(u), u.device)
    scale = bits if units == "bits" else 1
    d = scale * _pair_distance(u, S, bits)[pairs]
    d_sal = scale * _pair_distance(u_sal, S, bits)[pairs]
    m = bits / 4 if margin is None else margin
    return {
        **stats,
        "u_sal_abs_mean": float(u_sal.abs().mean()),
        "d": float(d.mean()),
        "d_sal": float(d_sal.mean()),
        "hinge_active": float((m - d + d_sal > 0).float().mean()),
    }


def map_statistics(salmap: torch.Tensor) -> dict[str, float]:
    """Mean of the Eq. 3 map (the share of the image kept) and its entropy as a distribution over
    pixels, relative to a flat map's (1.0 = flat, no localisation; lower = concentrated)."""
    mass = salmap.detach().flatten(1)
    p = mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1) / math.log(mass.shape[1])
    return {"map_mean": float(mass.mean()), "map_entropy": float(entropy.mean())}


def weighted_total(weighted: dict[str, tuple[float, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of weight * term, and the unweighted terms plus the total as floats for logging."""
    total = sum(w * term for w, term in weighted.values())
    logs = {name: float(term.detach()) for name, (_, term) in weighted.items()}
    logs["total"] = float(total.detach())
    return total, logs


def hashing_objective(
    u: torch.Tensor,
    u_sal: torch.Tensor,
    S: torch.Tensor,
    bits: int,
    *,
    lam: float = LAMBDA,
    alpha: float = ALPHA,
    margin: float | None = None,
    units: Units = "bits",
    norm: Norm = "abs",
    semantic_sal: bool = True,
    saliency: bool = False,
    quantization: bool = True,
    original: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 13, the hashing network's step: lam (J_sem_ori + J_sem_sal) + J_reg_ori + J_reg_sal.

    Switches for the ablations: `saliency=True` adds alpha * J_sal (Table 4's "J_sem + J_sal"
    rows for the hashing network), `semantic_sal=False` drops J_sem_sal, `quantization=False`
    drops both J_reg terms, `original=False` drops the original image's terms (J_sem_ori, J_reg_ori):
    the hashing network then learns only what it encodes at deployment, Hash(y) (Eq. 17). `norm` is that of the J_sem terms (see the module docstring). The returned
    dict holds the unweighted terms that entered the total.
    """
    terms = {"sem_ori": (lam, semantic_loss(u, S, bits, norm))} if original else {}
    if semantic_sal:
        terms["sem_sal"] = (lam, semantic_loss(u_sal, S, bits, norm))
    if saliency:
        terms["sal"] = (alpha, saliency_loss(u, u_sal, S, bits, margin, units))
    if quantization:
        if original:
            terms["reg_ori"] = (1.0, quantization_loss(u))
        terms["reg_sal"] = (1.0, quantization_loss(u_sal))
    return weighted_total(terms)


def attention_objective(
    u: torch.Tensor,
    u_sal: torch.Tensor,
    S: torch.Tensor,
    bits: int,
    *,
    alpha: float = ALPHA,
    lam: float = LAMBDA,
    margin: float | None = None,
    units: Units = "bits",
    norm: Norm = "abs",
    semantic: bool = True,
    saliency: bool = True,
    quantization: bool = True,
    salmap: torch.Tensor | None = None,
    area: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 14, the attention network's step: alpha J_sal + lam J_sem_sal + J_reg_sal.

    Only terms that depend on the saliency image appear: u comes from the original image and
    does not depend on the attention network. Switches for Table 4's attention rows:
    `semantic=False` (J_sal only), `saliency=False` (J_sem only); `quantization=False` drops
    J_reg_sal. `area > 0` (a departure; 0 is the paper) adds area * sum_i mean(Salmap_i): the map
    pays for every pixel it keeps, so it keeps the ones the codes need.
    """
    terms: dict[str, tuple[float, torch.Tensor]] = {}
    if saliency:
        terms["sal"] = (alpha, saliency_loss(u, u_sal, S, bits, margin, units))
    if semantic:
        terms["sem_sal"] = (lam, semantic_loss(u_sal, S, bits, norm))
    if quantization:
        terms["reg_sal"] = (1.0, quantization_loss(u_sal))
    if area:
        terms["area"] = (area, salmap.flatten(1).mean(dim=1).sum())
    if not terms:
        raise ValueError("attention_objective needs at least one term switched on")
    return weighted_total(terms)


def simultaneous_objective(
    u: torch.Tensor,
    u_sal: torch.Tensor,
    S: torch.Tensor,
    bits: int,
    *,
    lam: float = SIMULTANEOUS_LAMBDA,
    alpha: float = SIMULTANEOUS_ALPHA,
    margin: float | None = None,
    units: Units = "bits",
    norm: Norm = "abs",
    saliency: bool = True,
    quantization: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 18, both networks in one step (Table 3): lam J_sem + alpha J_sal + J_reg.

    J_sem = J_sem_ori + J_sem_sal (Eq. 8), J_reg = both Eq. 11 terms; lam = 60, alpha = 0.01
    as in sec. 4.6. `saliency=False` / `quantization=False` drop J_sal / J_reg.
    """
    terms = {"sem_ori": (lam, semantic_loss(u, S, bits, norm)), "sem_sal": (lam, semantic_loss(u_sal, S, bits, norm))}
    if saliency:
        terms["sal"] = (alpha, saliency_loss(u, u_sal, S, bits, margin, units))
    if quantization:
        terms["reg_ori"] = (1.0, quantization_loss(u))
        terms["reg_sal"] = (1.0, quantization_loss(u_sal))
    return weighted_total(terms)


def dpsh_loss(u: torch.Tensor, S: torch.Tensor, eta: float = DPSH_ETA) -> torch.Tensor:
    """DPSH: the pairwise likelihood (`_likelihood`) plus eta * sum_i ||u_i - b_i||^2 with
    b = +1 where u >= 0 else -1 (held fixed)."""
    return _likelihood(u, S) + eta * (u - pm1_from_u(u).detach()).pow(2).sum()
