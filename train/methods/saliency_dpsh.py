"""DSaH's contribution, the attention network and the quadruple saliency loss (Eq. 9-10, 14),
around DPSH's pair likelihood in place of Eq. 6's J_sem, in every phase (Eq. 13, 14, 18).

Why a method of its own: with many classes most pairs are dissimilar and Eq. 6 asks every one of
them for u_i.u_j = -k, which no more than two codes can satisfy at once; on synthetic-fg's 10
classes DSaH's hashing network then stays at chance before any attention step (d = k/2 for every
pair), while DPSH's likelihood learns (bench/results/train-evidence.md, "Issue 8, round 1"). This
method measures the attention apart from that semantic loss.
"""

from __future__ import annotations

from .dsah import DSaHMethod
from . import register_method


class SaliencyDPSHMethod(DSaHMethod):
    name = "saliency-dpsh"
    summary = "DSaH's attention network and saliency loss around DPSH's pair likelihood"
    semantic_norms = ("likelihood",)


register_method(SaliencyDPSHMethod())
