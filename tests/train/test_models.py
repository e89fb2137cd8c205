"""DSaH networks: code convention, Eq. 3-4, FCN-16s and FCN-8s geometry and fusion, the network pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dsah_rt.errors import UserError
from dsah_rt.train import methods
from dsah_rt.train import models as M

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def dsah() -> M.DSaH:
    torch.manual_seed(0)
    return M.build_dsah("small", 12, weights=None).eval()


# ---------------------------------------------------------------------------- code convention


def test_zero_is_bit_one_and_plus_one() -> None:
    u = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.5, -2.5])
    assert M.bits_from_u(u).tolist() == [True, True, True, False, True, False]
    assert M.pm1_from_u(u).tolist() == [1.0, 1.0, 1.0, -1.0, 1.0, -1.0]
    assert M.pm1_from_u(u.double()).dtype == torch.float64


# ------------------------------------------------------------------------------- Eq. 3 and 4


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.just(1), st.integers(1, 5), st.integers(1, 5)),
              elements=st.floats(-1e3, 1e3, width=32)))  # fmt: skip
def test_minmax_normalize(s: np.ndarray) -> None:
    out = M.minmax_normalize(torch.from_numpy(s))
    assert out.shape == s.shape and not torch.isnan(out).any()
    assert ((out >= 0) & (out <= 1)).all()
    for img, res in zip(s, out):
        if img.max() - img.min() > 1e-6:
            assert res.min().item() == 0.0 and res.max().item() == pytest.approx(1.0)
            expected = (img - img.min()) / (img.max() - img.min())
            np.testing.assert_allclose(res.numpy(), expected, rtol=1e-5, atol=1e-6)
        else:
            assert (res == 1).all()  # the documented choice: a flat map keeps the whole image


def test_minmax_normalize_flat_map_has_finite_gradient() -> None:
    s = torch.cat([torch.full((1, 1, 4, 4), 3.0), torch.randn(1, 1, 4, 4)]).requires_grad_()
    out = M.minmax_normalize(s)
    assert (out[0] == 1).all()
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[0] == 0).all() and s.grad[1].abs().sum() > 0


def test_saliency_image_masks_in_pixel_space() -> None:
    x = torch.rand(2, 3, 8, 8)
    salmap = torch.rand(2, 1, 8, 8)
    salmap[:, :, :4] = 1.0
    salmap[:, :, 6:] = 0.0
    y = M.saliency_image(salmap, x)
    assert y.shape == x.shape
    assert torch.equal(y[:, :, :4], x[:, :, :4])
    assert (y[:, :, 6:] == 0).all()  # black, not the normalised mean colour


def test_normalize_uses_buffers() -> None:
    norm = M.Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    x = torch.ones(1, 3, 2, 2)
    assert norm(x)[0, :, 0, 0].tolist() == [1.0, 3.0, 0.5]
    assert set(dict(norm.named_buffers())) == {"mean", "std"}


# ---------------------------------------------------------------------------------- FCN-16s


def test_bilinear_upsampler_is_bilinear_interpolation() -> None:
    x = torch.randn(1, 1, 6, 7)
    for factor in (2, 16):
        up = M._bilinear_upsampler(factor)
        got = up(x)
        assert got.shape[-2:] == (6 * factor, 7 * factor)
        ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        inner = slice(factor, -factor)  # borders differ: the deconvolution pads with zeros
        torch.testing.assert_close(got[..., inner, inner], ref[..., inner, inner])


@pytest.fixture(scope="module")
def dsah8() -> M.DSaH:
    torch.manual_seed(0)
    return M.build_dsah("small", 12, weights=None, fcn="8s").eval()


@pytest.mark.parametrize("size", [(64, 64), (96, 128), (32, 32), (70, 50), (33, 47), (100, 100)])
@pytest.mark.parametrize("fcn", ["16s", "8s"])
def test_attention_output_is_input_sized(dsah: M.DSaH, dsah8: M.DSaH, fcn: str, size: tuple[int, int]) -> None:
    with torch.no_grad():
        out = (dsah if fcn == "16s" else dsah8).attention(torch.rand(2, 3, *size))
    assert out.shape == (2, 1, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backbone", ["small", "efficientnet_lite0"])
def test_the_pyramid_is_the_features_at_strides_8_16_32(backbone: str) -> None:
    from dsah_rt.train.backbones import build_backbone

    torch.manual_seed(0)
    net = build_backbone(backbone, None).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        c3, c4, c5 = net.forward_pyramid(x)
        c4_alone, c5_alone = net.forward_features(x)
    assert c3.shape[1:] == (net.c3_channels, 8, 8) and c4.shape[-1] == 4 and c5.shape[-1] == 2
    assert torch.equal(c4, c4_alone) and torch.equal(c5, c5_alone)  # the same layers, cut in one more place


def _output_change_from(net: M.AttentionNet, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|output change| when one score cell of `layer` (row 0, column 0) is raised by 1."""

    def bump(_module, _inputs, out):
        out = out.clone()
        out[:, :, 0, 0] += 1.0
        return out

    with torch.no_grad():
        base = net(x)
        handle = layer.register_forward_hook(bump)
        try:
            bumped = net(x)
        finally:
            handle.remove()
    return (bumped - base).abs()[0, 0]


def test_stride16_and_stride32_scores_both_reach_the_output(dsah: M.DSaH) -> None:
    net = dsah.attention
    x = torch.rand(1, 3, 128, 128)
    from_c4 = _output_change_from(net, net.score_c4, x)
    from_c5 = _output_change_from(net, net.score_c5, x)
    rows4, cols4 = torch.nonzero(from_c4 > 1e-6, as_tuple=True)
    rows5, cols5 = torch.nonzero(from_c5 > 1e-6, as_tuple=True)
    # one stride-16 cell reaches about one 16-pixel cell (plus the bilinear fringe) of the output;
    # one stride-32 cell, upsampled twice, reaches about twice as far
    assert len(rows4) > 0 and rows4.max() < 32 and cols4.max() < 32
    assert len(rows5) > 0 and rows5.max() >= 32 and rows5.max() < 64


def test_fcn8s_adds_a_stride8_score_that_starts_at_zero(dsah8: M.DSaH) -> None:
    net = dsah8.attention
    assert net.fcn == "8s" and not net.score_c3.weight.any() and not net.score_c3.bias.any()
    x = torch.rand(1, 3, 128, 128)
    from_c3 = _output_change_from(net, net.score_c3, x)
    from_c4 = _output_change_from(net, net.score_c4, x)
    rows3, cols3 = torch.nonzero(from_c3 > 1e-6, as_tuple=True)
    rows4 = torch.nonzero(from_c4 > 1e-6, as_tuple=True)[0]
    # one stride-8 cell reaches about one 8-pixel cell (plus the fringe): half as far as a stride-16 one
    assert len(rows3) > 0 and rows3.max() < 16 and cols3.max() < 16
    assert rows4.max() >= 16 and rows4.max() < 32
    with pytest.raises(UserError, match="fcn must be one of 16s, 8s"):
        M.build_dsah("small", 12, weights=None, fcn="4s")


# --------------------------------------------------------------------------- networks and pair


def test_shapes_and_encode(dsah: M.DSaH) -> None:
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        u, u_sal, salmap = dsah(x)
        salmap2, y = dsah.saliency(x)
        assert u.shape == u_sal.shape == (3, 12)
        assert salmap.shape == (3, 1, 64, 64)
        assert torch.equal(salmap, salmap2)
        torch.testing.assert_close(u, dsah.hashing(x))
        torch.testing.assert_close(u_sal, dsah.hashing(y))
        torch.testing.assert_close(dsah.encode(x), u_sal)  # Eq. 17 codes come from the saliency image
        assert dsah.hashing(torch.rand(5, 3, 40, 40)).shape == (5, 12)


def test_networks_have_separate_parameters(dsah: M.DSaH) -> None:
    att = {p.data_ptr() for p in dsah.attention.parameters()}
    hsh = {p.data_ptr() for p in dsah.hashing.parameters()}
    assert att and hsh and not att & hsh
    assert dsah.attention.backbone is not dsah.hashing.backbone
    assert dsah.attention.backbone.head is None  # dropped: the FCN never uses the pooled head


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = M.build_dsah("small", 12, weights=None).train()
    x = torch.rand(4, 3, 64, 64)
    u, u_sal, _ = model(x)
    (u.square().sum() + u_sal.square().sum()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_vgg16_fc_layers_become_the_fcn_convolutions() -> None:
    torch.manual_seed(0)
    pool5, width = 8, 16
    head = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(7), torch.nn.Flatten(1),
        torch.nn.Linear(pool5 * 49, width), torch.nn.ReLU(), torch.nn.Dropout(0.5),
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Dropout(0.5),
    ).eval()  # fmt: skip
    from dsah_rt.train.backbones.vgg import convolutionalize_vgg_head

    fc = convolutionalize_vgg_head(head).eval()
    c5 = torch.randn(2, pool5, 7, 7)
    with torch.no_grad():
        dense = fc(c5)
        assert dense.shape == (2, width, 7, 7)
        # at the centre the padded 7x7 kernel sees exactly the window the Linear layer sees
        torch.testing.assert_close(dense[:, :, 3, 3], head(c5), rtol=1e-5, atol=1e-5)


def test_dpsh_and_registry() -> None:
    model = methods.build_model("dpsh", "small", 24, weights="none")
    assert isinstance(model, M.DPSH)
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 24)
        torch.testing.assert_close(model.encode(x), model(x))
    assert isinstance(methods.build_model("dsah", "small", 24, weights=None, fc_channels=32), M.DSaH)
    with pytest.raises(UserError, match="unknown method"):
        methods.build_model("dsh", "small", 24)
    with pytest.raises(UserError, match="bits"):
        methods.build_model("dpsh", "small", 0, weights=None)


@pytest.mark.parametrize("method", ["dsah", "dsah-8s", "dpsh"])
def test_config_rebuilds_the_model(method: str) -> None:
    torch.manual_seed(0)
    arch = {"dsah": {"fc_channels": 32}, "dsah-8s": {"fc_channels": 32, "fcn": "8s"}, "dpsh": {}}[method]
    method = method.removesuffix("-8s")
    model = methods.build_model(method, "small", 12, weights=None, **arch).eval()
    config = model.config()
    assert config.get("fcn") == arch.get("fcn", "16s" if method == "dsah" else None)
    assert config["method"] == method and config["backbone"] == "small" and config["bits"] == 12
    assert config["input_size"] == 64 and len(config["mean"]) == len(config["std"]) == 3
    assert config["weights_source"] == "none (random init)"
    rebuilt = methods.model_from_config(config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode(x), model.encode(x))


def test_a_config_from_before_fcn8s_rebuilds_fcn16s() -> None:
    config = methods.build_model("dsah", "small", 12, weights=None, fcn="16s").config()
    del config["fcn"]
    assert methods.model_from_config(config).attention.fcn == "16s"
