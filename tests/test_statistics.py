"""engine.statistics: one Hessian per input, shared by the linears that read it, formed in place."""

import pytest
import torch

from compresslm.engine.blocks import collect_statistics
from compresslm.models.forward import capture_first_block_inputs
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import byte_tokenizer, tiny_model
from compresslm.quant.gptq import factor_hessian, hessian_from_inputs, inverse_cholesky


def _block_statistics():
    lm = LoadedModel.from_module(tiny_model("llama"), byte_tokenizer(), name="tiny-llama")
    windows = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    batches = capture_first_block_inputs(lm, windows, 2, torch.device("cpu"))
    block = lm.layout.blocks[0]
    captured = {}
    q = next(info for info in block.linears if info.role == "q")
    handle = q.module.register_forward_pre_hook(lambda m, args: captured.setdefault("x", []).append(args[0]))
    try:
        stats, _ = collect_statistics(block, batches, torch.device("cpu"))
    finally:
        handle.remove()
    return block, stats, torch.cat([x.reshape(-1, x.shape[-1]) for x in captured["x"]])


def test_linears_reading_one_input_share_one_hessian_formed_in_place():
    block, stats, inputs = _block_statistics()
    names = {info.role: info.name for info in block.linears}
    h = stats.hessian(names["q"])
    assert stats.hessian(names["k"]) is h and stats.hessian(names["v"]) is h
    assert stats.hessian(names["q"]) is h  # asked again: the same tensor, not a new copy
    assert torch.allclose(h, hessian_from_inputs(inputs), rtol=1e-5, atol=1e-6)
    owner = stats.stats[stats.owner[names["q"]]]
    assert owner.xtx is None  # the running sum became the Hessian
    with pytest.raises(RuntimeError, match="after the Hessian was formed"):
        owner.add(inputs)


@pytest.mark.parametrize("act_order", [False, True])
def test_factor_hessian_equals_the_sweep_order_factorization(act_order):
    x = torch.randn(256, 48, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 48)
    x[:, [5, 17]] = 0  # dead inputs
    h = hessian_from_inputs(x)
    factor = factor_hessian(h, 0.01, 3, act_order)
    expected = h.clone()
    dead = torch.diag(expected) == 0
    expected[dead, dead] = 1.0
    if act_order:
        expected = expected[factor.perm][:, factor.perm]
    upper, lam, retries = inverse_cholesky(expected, 0.01, 3)
    assert torch.equal(factor.hinv, upper) and factor.damp_used == lam and factor.retries == retries
    assert torch.equal(factor.dead, dead)


@pytest.mark.parametrize("width", [64, 600])
def test_the_hessian_from_upper_blocks_is_the_full_product(width):
    """Wide inputs accumulate only the blocks on and above the diagonal; the Hessian mirrors them."""
    from compresslm.engine.statistics import InputStatistics

    torch.manual_seed(width)
    batches = [torch.randn(2, 40, width) * torch.linspace(0.1, 3, width) for _ in range(3)]
    stats = InputStatistics(width, torch.device("cpu"))
    for batch in batches:
        stats.add(batch)
    expected = hessian_from_inputs(torch.cat([b.reshape(-1, width) for b in batches]))
    assert torch.equal(stats.hessian, stats.hessian.T)
    assert torch.allclose(stats.hessian, expected, rtol=1e-5, atol=1e-5)
