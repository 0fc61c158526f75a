"""Bit packing round trips exactly at every width and costs exactly bits·n."""

from __future__ import annotations

import pytest
import torch

from compresslm.formats.packing import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 1001])
def test_round_trip(bits, count):
    torch.manual_seed(bits * count)
    codes = torch.randint(0, 2**bits, (count,), dtype=torch.uint8)
    data = pack_bits(codes, bits)
    assert len(data) == packed_nbytes(count, bits) == (count * bits + 7) // 8
    assert torch.equal(unpack_bits(data, bits, count), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 5, 8, 13, 1001])
def test_the_stream_is_little_endian_bit_by_bit(bits, count):
    """The format, spelt out one bit at a time: code i's bit j is bit i·bits + j of the stream, each byte's
    lowest bit first (what containers written before the word-wise packer hold)."""
    import numpy as np

    codes = torch.randint(0, 2**bits, (count,), dtype=torch.uint8, generator=torch.Generator().manual_seed(count))
    stream = np.unpackbits(codes.numpy()[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1)
    assert pack_bits(codes, bits) == np.packbits(stream, bitorder="little").tobytes()


def test_errors():
    with pytest.raises(ValueError, match="exceeds 3 bits"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="expected 2 bytes"):
        unpack_bits(b"\x00", 4, 4)


@pytest.mark.parametrize("bits", range(1, 9))
def test_lanes_round_trip(bits):
    from compresslm.runtime.packed import lane_bits, pack_lanes, unpack_lanes

    codes = torch.randint(0, 1 << bits, (7, 13), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    lane = lane_bits(bits)
    packed = pack_lanes(codes, lane)
    assert packed.numel() == -(-codes.numel() * lane // 8)
    assert torch.equal(unpack_lanes(packed, lane, codes.numel()).view(7, 13), codes)
