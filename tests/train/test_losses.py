"""The vectorised losses against double loops over pairs written straight from the paper's equations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsah_rt.train.losses import (
    NORMS, attention_objective, dpsh_loss, hashing_objective, quantization_loss, saliency_loss, semantic_loss, similarity,
    simultaneous_objective,
)

pytestmark = pytest.mark.usefixtures("single_thread")

BITS = st.sampled_from([12, 24, 48])
ANY_NORM = st.sampled_from(NORMS)
POWER = {"abs": 1, "square": 2}  # the exponent of |S_ij - estimate| in J_sem for each norm


# ------------------------------------------------------------------ references (plain Python floats)


def ref_similarity(la: list, lb: list) -> list[list[float]]:
    if isinstance(la[0], list):  # multi-hot: similar iff some label is on in both
        return [[float(any(x and y for x, y in zip(a, b))) for b in lb] for a in la]
    return [[float(a == b) for b in lb] for a in la]


def ref_estimate(ui: list[float], uj: list[float], k: int) -> float:
    return (sum(x * y for x, y in zip(ui, uj)) + k) / (2 * k)


def ref_semantic(u: list, S: list, k: int, norm: str = "abs") -> float:
    if norm == "likelihood":
        return ref_dpsh(u, S, 0.0)
    n = len(u)
    return sum(abs(S[i][j] - ref_estimate(u[i], u[j], k)) ** POWER[norm] for i in range(n) for j in range(i + 1, n))


def ref_saliency(u: list, us: list, S: list, k: int, m: float, units: str) -> float:
    scale = k if units == "bits" else 1
    total = 0.0
    for i in range(len(u)):
        for j in range(i + 1, len(u)):
            d = scale * abs(S[i][j] - ref_estimate(u[i], u[j], k))
            d_sal = scale * abs(S[i][j] - ref_estimate(us[i], us[j], k))
            total += max(m - d + d_sal, 0.0)
    return total


def ref_quantization(u: list) -> float:
    return sum(abs(x - (1.0 if x >= 0 else -1.0)) for row in u for x in row)


def ref_dpsh(u: list, S: list, eta: float) -> float:
    total = 0.0
    for i in range(len(u)):
        for j in range(i + 1, len(u)):
            theta = sum(x * y for x, y in zip(u[i], u[j])) / 2
            total += math.log(1 + math.exp(theta)) - S[i][j] * theta
    return total + eta * sum((x - (1.0 if x >= 0 else -1.0)) ** 2 for row in u for x in row)


# -------------------------------------------------------------------------------- strategies


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(u, u', labels, k): random float64 codes at several scales, some entries exactly 0 (the
    code convention's edge), and class-id or multi-hot labels. Codes come from a drawn seed,
    which is much faster than drawing hundreds of floats one by one."""
    n = draw(st.integers(2, 8))
    k = draw(BITS)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    zero_fraction = draw(st.sampled_from([0.0, 0.3]))

    def codes() -> torch.Tensor:
        u = rng.normal(size=(n, k)) * draw(st.sampled_from([0.1, 1.0, 3.0]))
        u[rng.random((n, k)) < zero_fraction] = 0.0
        return torch.from_numpy(u)

    u, u_sal = codes(), codes()
    if draw(st.booleans()):
        labels = torch.from_numpy(rng.random((n, 4)) < 0.3)
    else:
        labels = torch.from_numpy(rng.integers(0, 3, n))
    return u, u_sal, labels, k


def _S(labels: torch.Tensor) -> torch.Tensor:
    return similarity(labels, labels).double()


# ------------------------------------------------------------------------------------- values


@settings(max_examples=60, deadline=None)
@given(batches())
def test_similarity_matches_definition(batch) -> None:
    _, _, labels, _ = batch
    got = similarity(labels, labels)
    assert got.dtype == torch.float32
    assert got.tolist() == ref_similarity(labels.tolist(), labels.tolist())


def test_similarity_rectangular_and_unlabelled() -> None:
    a = torch.tensor([[1, 0, 0], [0, 0, 0]])
    b = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    # an image with no label shares none, not even with another unlabelled image
    assert similarity(a, b).tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError):
        similarity(torch.tensor([0, 1]), torch.tensor([[1, 0]]))


@settings(max_examples=60, deadline=None)
@given(batches(), ANY_NORM)
def test_semantic_loss(batch, norm) -> None:
    u, _, labels, k = batch
    S = _S(labels)
    got = semantic_loss(u, S, k, norm).item()
    assert got == pytest.approx(ref_semantic(u.tolist(), S.tolist(), k, norm), rel=1e-9, abs=1e-9)


def test_semantic_loss_rejects_unknown_norm() -> None:
    with pytest.raises(ValueError, match="norm"):
        semantic_loss(torch.zeros(2, 12), torch.eye(2), 12, "l1")


@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from(["bits", "unit"]), st.one_of(st.none(), st.floats(0.0, 20.0)))
def test_saliency_loss(batch, units, margin) -> None:
    u, u_sal, labels, k = batch
    S = _S(labels)
    m = k / 4 if margin is None else margin
    got = saliency_loss(u, u_sal, S, k, margin=margin, units=units).item()
    assert got == pytest.approx(ref_saliency(u.tolist(), u_sal.tolist(), S.tolist(), k, m, units), rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(batches())
def test_quantization_loss(batch) -> None:
    u, _, _, _ = batch
    assert quantization_loss(u).item() == pytest.approx(ref_quantization(u.tolist()), rel=1e-12, abs=1e-12)


def test_quantization_treats_zero_as_plus_one() -> None:
    u = torch.tensor([[0.0, -0.0, 1.0, -1.0]])
    assert quantization_loss(u).item() == 2.0  # both zeros sit 1 away from b = +1


@settings(max_examples=60, deadline=None)
@given(batches(), st.floats(0.0, 20.0))
def test_dpsh_loss(batch, eta) -> None:
    u, _, labels, _ = batch
    S = _S(labels)
    got = dpsh_loss(u, S, eta).item()
    assert got == pytest.approx(ref_dpsh(u.tolist(), S.tolist(), eta), rel=1e-9, abs=1e-9)


def test_dpsh_loss_is_finite_for_huge_inner_products() -> None:
    u = torch.full((2, 48), 40.0)  # theta = 48 * 1600 / 2: exp overflows, softplus does not
    S = torch.zeros(2, 2)
    assert torch.isfinite(dpsh_loss(u, S, 0.0))
    assert dpsh_loss(u, S, 0.0).item() == pytest.approx(48 * 1600 / 2)


def test_saliency_hinge_switches_off_in_bit_units_only() -> None:
    k = 12
    S = torch.ones(2, 2)  # a similar pair
    u = torch.tensor([[1.0] * k, [-1.0] * k])  # original codes as wrong as possible: d = 1
    u_sal = torch.ones(2, k)  # saliency codes exactly right: d' = 0
    assert saliency_loss(u, u_sal, S, k, units="bits").item() == 0.0  # k/4 - k < 0
    # in unit distances the default margin k/4 = 3 exceeds any d - d', so the hinge stays on
    assert saliency_loss(u, u_sal, S, k, units="unit").item() == pytest.approx(k / 4 - 1)
    with pytest.raises(ValueError):
        saliency_loss(u, u_sal, S, k, units="hamming")


# ---------------------------------------------------------------------------------- objectives


@settings(max_examples=30, deadline=None)
@given(batches(), st.sampled_from(["bits", "unit"]), ANY_NORM)
def test_objectives_combine_the_paper_terms(batch, units, norm) -> None:
    u, u_sal, labels, k = batch
    S = _S(labels)
    ul, usl, Sl = u.tolist(), u_sal.tolist(), S.tolist()
    sem_ori, sem_sal = ref_semantic(ul, Sl, k, norm), ref_semantic(usl, Sl, k, norm)
    sal = ref_saliency(ul, usl, Sl, k, k / 4, units)  # the norm is J_sem's only: d_ij stays |...|
    reg_ori, reg_sal = ref_quantization(ul), ref_quantization(usl)
    approx = lambda x: pytest.approx(x, rel=1e-9, abs=1e-9)  # noqa: E731

    total, terms = hashing_objective(u, u_sal, S, k, units=units, norm=norm)  # Eq. 13
    assert total.item() == approx(30 * (sem_ori + sem_sal) + reg_ori + reg_sal)
    expected = {"sem_ori": sem_ori, "sem_sal": sem_sal, "reg_ori": reg_ori, "reg_sal": reg_sal, "total": total.item()}
    assert terms == approx(expected)
    total, _ = hashing_objective(u, u_sal, S, k, units=units, norm=norm, saliency=True, semantic_sal=False,
                                   quantization=False)  # fmt: skip
    assert total.item() == approx(30 * sem_ori + 40 * sal)

    total, terms = attention_objective(u, u_sal, S, k, units=units, norm=norm)  # Eq. 14
    assert total.item() == approx(40 * sal + 30 * sem_sal + reg_sal)
    assert set(terms) == {"sal", "sem_sal", "reg_sal", "total"}
    for switch, expected_total in [
        ({"semantic": False}, 40 * sal + reg_sal),  # Table 4: attention trained with J_sal only
        ({"saliency": False}, 30 * sem_sal + reg_sal),  # Table 4: attention trained with J_sem only
        ({"quantization": False}, 40 * sal + 30 * sem_sal),
    ]:
        got = attention_objective(u, u_sal, S, k, units=units, norm=norm, **switch)[0].item()
        assert got == approx(expected_total)

    total, _ = simultaneous_objective(u, u_sal, S, k, units=units, norm=norm)  # Eq. 18
    assert total.item() == approx(60 * (sem_ori + sem_sal) + 0.01 * sal + reg_ori + reg_sal)
    total, _ = simultaneous_objective(u, u_sal, S, k, units=units, norm=norm, saliency=False,
                                        quantization=False)  # fmt: skip
    assert total.item() == approx(60 * (sem_ori + sem_sal))


def test_attention_objective_needs_a_term() -> None:
    u = torch.zeros(2, 12)
    with pytest.raises(ValueError):
        attention_objective(u, u, torch.eye(2), 12, semantic=False, saliency=False, quantization=False)


# ----------------------------------------------------------------------------------- gradients


def _loop_objective(
    u: torch.Tensor, u_sal: torch.Tensor, S: torch.Tensor, k: int, eta: float, norm: str
) -> torch.Tensor:
    """Attention objective (Eq. 14, bit units, J_sem with `norm`) plus the DPSH loss, one scalar
    tensor op per pair."""
    total = torch.zeros((), dtype=u.dtype)
    m = k / 4
    for i in range(len(u)):
        for j in range(i + 1, len(u)):
            d = k * (S[i, j] - (torch.dot(u[i], u[j]) + k) / (2 * k)).abs()
            d_sal_unit = (S[i, j] - (torch.dot(u_sal[i], u_sal[j]) + k) / (2 * k)).abs()
            if norm == "likelihood":
                theta_sal = torch.dot(u_sal[i], u_sal[j]) / 2
                semantic = torch.log1p(torch.exp(theta_sal)) - S[i, j] * theta_sal
            else:
                semantic = d_sal_unit ** POWER[norm]
            total = total + 40 * torch.clamp(m - d + k * d_sal_unit, min=0) + 30 * semantic
            theta = torch.dot(u[i], u[j]) / 2
            total = total + torch.log1p(torch.exp(theta)) - S[i, j] * theta
    for i in range(len(u)):
        b = torch.where(u_sal[i] >= 0, 1.0, -1.0).double()
        total = total + (u_sal[i] - b).abs().sum()
        b = torch.where(u[i] >= 0, 1.0, -1.0).double()
        total = total + eta * ((u[i] - b) ** 2).sum()
    return total


GRADIENT_SEEDS = range(6)


def _gradient_case(seed: int) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n, k = 2 + seed, [12, 24, 48][seed % 3]
    labels = torch.randint(0, 3, (n,), generator=gen)
    S = similarity(labels, labels).double()
    # wide original codes against narrow saliency codes: d - d' lands on both sides of the margin
    u0 = 2 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    us0 = 0.5 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    return S, k, u0, us0


def test_gradient_cases_cover_both_sides_of_the_hinge() -> None:
    states = set()
    for seed in GRADIENT_SEEDS:
        S, k, u, us = _gradient_case(seed)
        for i in range(len(u)):
            for j in range(i + 1, len(u)):
                d = k * abs(S[i, j].item() - ref_estimate(u[i].tolist(), u[j].tolist(), k))
                d_sal = k * abs(S[i, j].item() - ref_estimate(us[i].tolist(), us[j].tolist(), k))
                states.add(k / 4 - d + d_sal > 0)
    assert states == {True, False}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("seed", GRADIENT_SEEDS)
def test_gradients_match_the_pair_loop(seed: int, norm: str) -> None:
    S, k, u0, us0 = _gradient_case(seed)
    grads = []
    for objective in (
        lambda u, us: attention_objective(u, us, S, k, norm=norm)[0] + dpsh_loss(u, S, 0.5),
        lambda u, us: _loop_objective(u, us, S, k, 0.5, norm),
    ):
        u, us = u0.clone().requires_grad_(), us0.clone().requires_grad_()
        objective(u, us).backward()
        grads.append((u.grad, us.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-7, atol=1e-7)
    assert grads[0][1].abs().sum() > 0
