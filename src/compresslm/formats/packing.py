"""Bit packing: b-bit codes (1 <= b <= 8) stored densely, little-endian bit order.

Codes of any width are laid end to end in one bit stream, so 3-bit codes cost exactly 3 bits
each (plus at most 7 bits of padding per tensor). `unpack_bits(pack_bits(c, b), b, c.numel())`
returns `c` exactly.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> bytes:
    """Pack uint8 codes (each < 2**bits) into a byte string of ceil(n·bits/8) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.detach().cpu().reshape(-1).numpy().astype(np.uint8, copy=False)
    if bits == 8:
        return flat.tobytes()
    if flat.size and int(flat.max()) >= 1 << bits:
        raise ValueError(f"a code exceeds {bits} bits")
    bit_matrix = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: `count` uint8 codes."""
    if len(data) != packed_nbytes(count, bits):
        raise ValueError(f"expected {packed_nbytes(count, bits)} bytes for {count} {bits}-bit codes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return torch.from_numpy(raw.copy())
    stream = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, :bits] = stream
    return torch.from_numpy(np.packbits(padded, axis=1, bitorder="little").reshape(-1))
