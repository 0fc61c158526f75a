"""Bit packing: b-bit codes (1 <= b <= 8) stored densely, little-endian bit order.

Codes of any width are laid end to end in one bit stream, so 3-bit codes cost exactly 3 bits
each (plus at most 7 bits of padding per tensor). `unpack_bits(pack_bits(c, b), b, c.numel())`
returns `c` exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> bytes:
    """Pack uint8 codes (each < 2**bits) into a byte string of ceil(n·bits/8) bytes.

    Eight codes fill exactly `bits` bytes: each run of eight is summed into one little-endian 64-bit
    word (code i shifted by i·bits) whose low `bits` bytes are the stream's, so the work is a few
    array operations per eight codes rather than one per bit.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.detach().cpu().reshape(-1).numpy().astype(np.uint8, copy=False)
    if bits == 8:
        return flat.tobytes()
    if flat.size and int(flat.max()) >= 1 << bits:
        raise ValueError(f"a code exceeds {bits} bits")
    count = flat.size
    runs = np.zeros((-(-count // 8), 8), dtype=np.uint64)
    runs.reshape(-1)[:count] = flat
    words = np.zeros(runs.shape[0], dtype=np.uint64)
    for i in range(8):
        words |= runs[:, i] << np.uint64(i * bits)
    stream = words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits]
    return stream.tobytes()[: packed_nbytes(count, bits)]


def unpack_bits(data: bytes, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: `count` uint8 codes."""
    if len(data) != packed_nbytes(count, bits):
        raise ValueError(f"expected {packed_nbytes(count, bits)} bytes for {count} {bits}-bit codes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return torch.from_numpy(raw.copy())
    runs = -(-count // 8)
    stream = np.zeros((runs, 8), dtype=np.uint8)
    padded = np.zeros(runs * bits, dtype=np.uint8)
    padded[: raw.size] = raw
    stream[:, :bits] = padded.reshape(runs, bits)
    words = stream.view("<u8").reshape(-1)
    mask = np.uint64((1 << bits) - 1)
    codes = np.empty((runs, 8), dtype=np.uint8)
    for i in range(8):
        codes[:, i] = (words >> np.uint64(i * bits)) & mask
    return torch.from_numpy(codes.reshape(-1)[:count].copy())


def _comb_table(m: int) -> np.ndarray:
    """C(j, r) for j, r in 0..m (zero where r > j), as int64."""
    table = np.zeros((m + 1, m + 1), dtype=np.int64)
    for j in range(m + 1):
        for r in range(j + 1):
            table[j, r] = math.comb(j, r)
    return table


def nm_index_bits(n: int, m: int) -> int:
    """Bits per group of M to name which N positions are kept: ceil(log2 C(M, N))."""
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def encode_nm(mask: torch.Tensor, n: int, m: int) -> np.ndarray:
    """Each group of M mask entries (exactly N True) as its rank among the C(M, N) patterns.

    The combinatorial number system: kept positions c1 < ... < cN give sum C(c_i, i). 2:4 needs
    ceil(log2 6) = 3 bits per 4 weights (0.75 bit per weight) instead of a 4-bit bitmask.
    """
    groups = mask.detach().cpu().numpy().reshape(-1, m).astype(np.int64)
    rank = np.cumsum(groups, axis=1)
    table = _comb_table(m)
    positions = np.broadcast_to(np.arange(m), groups.shape)
    return np.where(groups == 1, table[positions, rank], 0).sum(axis=1)


def decode_nm(index: np.ndarray, n: int, m: int) -> torch.Tensor:
    """Inverse of encode_nm: a bool array [groups, M]."""
    table = _comb_table(m)
    remaining = index.astype(np.int64).copy()
    groups = np.zeros((index.shape[0], m), dtype=bool)
    for r in range(n, 0, -1):
        fits = table[np.arange(m), r][None, :] <= remaining[:, None]  # C(j, r) <= remaining, increasing in j
        j = fits.sum(axis=1) - 1
        groups[np.arange(index.shape[0]), j] = True
        remaining -= table[j, r]
    return torch.from_numpy(groups)


def pack_lastdim(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits) along the last dimension, on the codes' device.

    Every 8 codes become `bits` bytes (little-endian bit order), so the last dimension must be a
    multiple of 8. Used where packing happens per step (the KV cache) and must stay in torch.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if bits == 8:
        return codes.to(torch.uint8)
    *lead, n = codes.shape
    if n % 8:
        raise ValueError(f"the last dimension ({n}) must be a multiple of 8 to pack")
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (codes.reshape(*lead, n // 8, 8).to(torch.int64) << shifts).sum(dim=-1)  # 8 codes in 8*bits bits
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((words[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, n // 8 * bits)


def unpack_lastdim(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_lastdim."""
    if bits == 8:
        return packed
    *lead, m = packed.shape
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (packed.reshape(*lead, m // bits, bits).to(torch.int64) << byte_shifts).sum(dim=-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    return ((words[..., None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(*lead, m // bits * 8)
