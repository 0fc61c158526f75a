"""Grids, RTN and GPTQ as pure tensor functions."""

from __future__ import annotations

import pytest
import torch

from compresslm.compressed import CompressedWeight, InvalidCompressedWeight
from compresslm.errors import CompressLMError
from compresslm.quant.gptq import GPTQOptions, factor_hessian, gptq, hessian_from_inputs, inverse_cholesky
from compresslm.quant.grid import Grid, GridError, fit_rows, fit_weight, quantize_codes
from compresslm.quant.rtn import rtn


def _weight(out_f=48, in_f=80, seed=0):
    torch.manual_seed(seed)
    return torch.randn(out_f, in_f) * 0.02


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("granularity", ["group", "channel", "tensor"])
def test_rtn_codes_are_on_the_grid_and_dequantize_exactly(bits, symmetric, granularity):
    w = _weight()
    cw = rtn(w, Grid(bits, granularity, 32, symmetric))
    assert cw.codes.dtype == torch.uint8 and int(cw.codes.max()) < 2**bits
    deq = cw.dequantize()
    assert torch.equal(deq, cw.dequantize())  # deterministic
    scales = cw.scales.float()
    # the error of every weight is at most half a step (asymmetric) or within the clamp range
    step = scales.max().item()
    assert (deq - w).abs().max().item() <= step * (1.0 if symmetric else 0.5) + 1e-7


def test_non_dividing_group_gets_a_shorter_last_group():
    w = _weight(4, 80)
    cw = rtn(w, Grid(4, "group", 32))
    assert cw.scales.shape == (4, 3)  # 32 + 32 + 16 columns
    w2 = w.clone()
    w2[:, 64:] *= 100  # only the last (short) group changes scale
    cw2 = rtn(w2, Grid(4, "group", 32))
    assert torch.equal(cw.scales[:, :2], cw2.scales[:, :2])
    assert not torch.equal(cw.scales[:, 2], cw2.scales[:, 2])


def test_group_larger_than_row_is_refused():
    with pytest.raises(GridError, match="group_size 128 is larger than the row"):
        rtn(_weight(4, 80), Grid(4, "group", 128))


def test_bad_grids():
    with pytest.raises(GridError, match="bits must be between 2 and 8"):
        Grid(9)
    with pytest.raises(GridError, match="granularity"):
        Grid(4, "row")
    with pytest.raises(GridError, match="group_size"):
        Grid(4, "group", 0)


def test_nan_weights_are_refused():
    w = _weight()
    w[3, 5] = float("nan")
    with pytest.raises(GridError, match="1 NaN or infinite"):
        rtn(w, Grid(4))


def test_more_bits_less_error():
    w = _weight()
    errors = [(rtn(w, Grid(b, "group", 16)).dequantize() - w).pow(2).sum().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_clip_search_does_not_increase_error_and_helps_at_low_bits():
    torch.manual_seed(1)
    w = torch.randn(64, 64)
    w[:, 0] *= 8  # outliers make the plain min/max range wasteful
    plain = (rtn(w, Grid(3, "group", 64)).dequantize() - w).abs().pow(2.4).sum()
    clipped = (rtn(w, Grid(3, "group", 64, clip_search=True)).dequantize() - w).abs().pow(2.4).sum()
    assert clipped < plain


def test_a_signed_scale_puts_each_groups_extreme_on_the_lowest_code():
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    record = rtn(w, Grid(4, "group", 32, symmetric=True, signed_scale=True))
    groups = w.view(16, 2, 32)
    at = groups.abs().argmax(dim=2, keepdim=True)
    assert bool((record.codes.view(16, 2, 32).gather(2, at) == 0).all())  # -8 steps of a signed scale
    assert torch.equal(torch.sign(record.scales.float()), -torch.sign(groups.gather(2, at)[..., 0]))
    extreme = record.dequantize().view(16, 2, 32).gather(2, at)
    assert torch.allclose(extreme, groups.gather(2, at), rtol=1e-3)  # only the scale's float16 rounding
    for bits in (3, 4, 5):  # a finer step and no clipped extreme: less error than the plain symmetric scale
        plain = (rtn(w, Grid(bits, "group", 32, symmetric=True)).dequantize() - w).pow(2).sum()
        signed = (rtn(w, Grid(bits, "group", 32, symmetric=True, signed_scale=True)).dequantize() - w).pow(2).sum()
        assert signed < plain
    with pytest.raises(GridError, match="signed_scale applies to symmetric grids"):
        Grid(4, signed_scale=True)
    assert torch.equal(
        rtn(torch.zeros(2, 32), Grid(4, "group", 32, True, signed_scale=True)).dequantize(), torch.zeros(2, 32)
    )


def test_the_clip_search_weights_each_columns_error_by_its_importance():
    torch.manual_seed(3)
    x = torch.randn(256, 32)
    x[:, 0] *= 6  # an outlier column the inputs barely use
    importance = torch.ones(32)
    importance[0] = 1e-4
    grid = Grid(3, "group", 32, symmetric=True, signed_scale=True, clip_search=True, clip_weighted=True)
    weighted = fit_rows(x, grid, importance=importance)[0]
    plain = fit_rows(x, grid)[0]
    unweighted = Grid(3, "group", 32, symmetric=True, signed_scale=True, clip_search=True)
    assert torch.equal(fit_rows(x, unweighted, importance=importance)[0], plain)  # weights only when asked
    assert float(weighted.abs().mean()) < 0.5 * float(plain.abs().mean())  # the outlier column is clipped

    def weighted_error(scale):  # the error the inputs see: the important columns' reconstruction
        codes = quantize_codes(x, scale[:, None], torch.full_like(scale, 4)[:, None], grid.maxq)
        return float((((codes - 4) * scale[:, None] - x).square() * importance).sum())

    assert weighted_error(weighted) < weighted_error(plain)


def test_a_kquant_fallback_keeps_the_clip_search():
    grid = Grid(
        3, "group", 16, True, clip_search=True, clip_weighted=True, clip_grid=50, signed_scale=True, kquant="q3_k"
    )
    fallback = grid.for_width(576)  # rows that super-blocks of 256 do not divide: llama.cpp's Q4_0
    assert (fallback.bits, fallback.group_size, fallback.signed_scale) == (4, 32, True)
    assert (fallback.clip_search, fallback.clip_weighted, fallback.clip_grid) == (True, True, 50)
    assert grid.for_width(512) is grid
    plain = Grid(2, "group", 16, kquant="q2_k").for_width(576)
    assert not plain.clip_search and not plain.clip_weighted


@pytest.mark.parametrize("kquant", ["q6_k", "q4_k", "q3_k", "q2_k"])
def test_the_kquant_refit_search_beats_the_range_search_and_keeps_the_lattice(kquant):
    from dataclasses import replace

    from compresslm.quant.grid import K_QUANTS, kquant_grid

    torch.manual_seed(0)
    weight = torch.randn(32, 512) * 0.02
    clip = replace(kquant_grid(kquant), clip_search=True)
    refit = replace(clip, refit=True)

    def error(grid):
        return float((rtn(weight, grid).dequantize() - weight).square().sum())

    assert error(refit) < error(clip)
    scales, _ = fit_weight(weight, refit)
    blocks = scales.view(32, 2, -1)
    d = blocks.abs().amax(dim=2, keepdim=True) / K_QUANTS[kquant].max_scale
    ratio = blocks / d
    assert torch.equal(d.half().float(), d) and torch.equal(ratio, ratio.round())  # still d · sc
    with pytest.raises(GridError, match="refit is a clip search of K-quant sub-blocks"):
        Grid(4, "group", 32, refit=True, clip_search=True)


def test_scales_are_float16_exact():
    scales, _ = fit_weight(_weight(), Grid(4, "group", 16))
    assert torch.equal(scales, scales.half().float())


def test_compressed_weight_invariants():
    codes = torch.zeros(2, 4, dtype=torch.uint8)
    scales = torch.ones(2, 2, dtype=torch.float16)
    zeros = torch.zeros(2, 2, dtype=torch.uint8)
    CompressedWeight((2, 4), 4, 2, False, codes, scales, zeros)
    with pytest.raises(InvalidCompressedWeight, match="codes exceed 2 bits"):
        CompressedWeight((2, 4), 2, 2, False, codes + 7, scales, zeros)
    with pytest.raises(InvalidCompressedWeight, match=r"scales must be float16 \(or float32\) of shape"):
        CompressedWeight((2, 4), 4, 2, False, codes, torch.ones(2, 3, dtype=torch.float16), zeros)
    with pytest.raises(InvalidCompressedWeight, match="NaN"):
        CompressedWeight((2, 4), 4, 2, False, codes, scales * float("nan"), zeros)
    with pytest.raises(InvalidCompressedWeight, match="group_size"):
        CompressedWeight((2, 4), 4, 5, False, codes, scales, zeros)


def _correlated_inputs(n=2048, in_f=80, seed=0):
    torch.manual_seed(seed)
    mix = torch.randn(in_f, in_f) / in_f**0.5
    x = torch.randn(n, in_f) @ mix + 0.1 * torch.randn(n, in_f)
    x[:, :3] *= 10  # a few outlier features, as in real activations
    return x


def _output_error(w, x, cw):
    return (x @ (w - cw.dequantize()).T).pow(2).mean().item()


@pytest.mark.parametrize(
    "grid", [Grid(4, "group", 32), Grid(3, "group", 16, symmetric=True), Grid(4, "channel"), Grid(3, "group", 24)]
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(grid, act_order):
    w, x = _weight(), _correlated_inputs()
    h = hessian_from_inputs(x)
    g = gptq(w, h, grid, GPTQOptions(act_order=act_order))
    assert _output_error(w, x, g) < 0.8 * _output_error(w, x, rtn(w, grid))
    assert g.meta["damp_retries"] == 0 and g.meta["act_order"] == act_order


def test_gptq_dead_inputs_and_singular_hessian():
    w = _weight()
    x = _correlated_inputs()
    x[:, 10] = 0  # a dead feature: its weights are zeroed, the Hessian stays solvable
    g = gptq(w, hessian_from_inputs(x), Grid(4, "group", 16))
    assert torch.all(g.dequantize()[:, 10] == 0)


def test_gptq_retries_damping_and_reports_it():
    w = _weight(8, 16)
    h = torch.eye(16)
    h[-1, -1] = -0.05  # indefinite: 1 % damping (~0.009) is not enough, 10 % (~0.09) is
    g = gptq(w, h, Grid(4, "group", 8), GPTQOptions(damp=0.01))
    assert g.meta["damp_retries"] == 1
    assert g.meta["damp_used"] == pytest.approx(0.1 * torch.diag(h).mean().item())
    with pytest.raises(CompressLMError, match="not positive definite"):
        gptq(w, -torch.eye(16), Grid(4, "group", 8), GPTQOptions(max_damp_retries=2))


@pytest.mark.parametrize("n", [40, 1500])  # below and above the size where the triangular inverse splits in halves
def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse(n):
    x = _correlated_inputs(n=4 * n, in_f=n).double()
    h = hessian_from_inputs(x).double()
    upper, lam, retries = inverse_cholesky(h.clone(), 0.01, 0)
    assert retries == 0 and torch.equal(upper, torch.triu(upper)) and bool((torch.diag(upper) > 0).all())
    expected = torch.linalg.inv(h + lam * torch.eye(n, dtype=h.dtype))
    assert torch.allclose(upper.T @ upper, expected, rtol=1e-8, atol=1e-10 * expected.abs().max().item())


def test_a_shared_hessian_is_factored_once_and_gives_the_same_codes():
    w1, w2 = _weight(), _weight(24, 80) * 3
    h = hessian_from_inputs(_correlated_inputs())
    first = factor_hessian(h, 0.01, 6)
    assert factor_hessian(h, 0.01, 6) is first  # the same Hessian, unchanged: reused
    assert factor_hessian(h, 0.01, 6, act_order=True) is not first
    reused = gptq(w2, h, Grid(4, "group", 16))
    fresh = gptq(w2, h.clone(), Grid(4, "group", 16))  # another tensor: factored anew
    assert torch.equal(reused.codes, fresh.codes) and reused.meta == fresh.meta
    before = factor_hessian(h, 0.01, 6)
    h.mul_(2)  # changed in place: the old factor must not be used
    after = factor_hessian(h, 0.01, 6)
    assert after is not before and torch.allclose(after.hinv, before.hinv / 2**0.5, rtol=1e-4, atol=1e-5)
    assert torch.equal(gptq(w1, h, Grid(4, "group", 16)).codes, gptq(w1, h.clone(), Grid(4, "group", 16)).codes)


def test_gptq_shape_check():
    with pytest.raises(CompressLMError, match="does not match"):
        gptq(_weight(), torch.eye(3), Grid(4, "group", 16))


def test_awq_scales_reduce_output_error_and_alpha_zero_is_plain_rtn():
    from compresslm.quant.awq import awq_clip, awq_scales, output_error

    w, x = _weight(), _correlated_inputs()
    h = hessian_from_inputs(x)
    grid = Grid(3, "group", 16)
    s, alpha, before, after = awq_scales([w], h, x.abs().mean(0), grid)
    assert before == pytest.approx(output_error(w, rtn(w, grid).dequantize(), h), rel=1e-5)
    assert after < before and alpha > 0
    clipped = awq_clip(w * s, h / (s[:, None] * s[None, :]), grid)
    assert output_error(w, clipped.dequantize() / s, h) <= after * (1 + 1e-6)


def test_awq_clip_never_worse_than_rtn():
    from compresslm.quant.awq import awq_clip, output_error

    w, x = _weight(), _correlated_inputs()
    h = hessian_from_inputs(x)
    for grid in (Grid(4, "group", 32), Grid(2, "channel"), Grid(4, "tensor")):
        assert output_error(w, awq_clip(w, h, grid).dequantize(), h) <= output_error(w, rtn(w, grid).dequantize(), h)
