"""A CompressedWeight held small in memory: codes several to a byte, a mask eight to a byte.

A record's codes are one byte each (uint8 [out, in]) whatever their width, and its mask one byte per
weight, so a 4-bit model held as records would take a quarter of its float32 size, not an eighth.
`PackedRecord` keeps codes in lanes of 1, 2, 4 or 8 bits (a 3-bit code takes a 4-bit lane, so two
codes share a byte), masks in 1-bit lanes, and rebuilds the exact record on demand (`record()`), so
what is computed from it is bit for bit what the record computes. Its tensors are registered as
buffers of the owning module, so they move with it between devices.
"""

from __future__ import annotations

import torch

from compresslm.compressed import CompressedWeight


def lane_bits(bits: int) -> int:
    """The lane a code of `bits` bits is stored in: 1, 2, 4 or 8 bits (lanes never straddle bytes)."""
    return next(lane for lane in (1, 2, 4, 8) if bits <= lane)


def pack_lanes(values: torch.Tensor, lane: int) -> torch.Tensor:
    """uint8 values (each < 2**lane) packed 8 // lane to a byte, little end first, padded with zeros."""
    flat = values.reshape(-1).to(torch.uint8)
    per_byte = 8 // lane
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = flat.view(-1, per_byte).to(torch.int32)
    shifts = torch.arange(0, 8, lane, dtype=torch.int32, device=flat.device)
    return (lanes << shifts).sum(dim=1).to(torch.uint8)


def unpack_lanes(packed: torch.Tensor, lane: int, count: int) -> torch.Tensor:
    """The first `count` values of `pack_lanes`' output, as uint8."""
    shifts = torch.arange(0, 8, lane, dtype=torch.uint8, device=packed.device)
    values = (packed[:, None] >> shifts) & ((1 << lane) - 1)
    return values.reshape(-1)[:count]


class PackedRecord:
    """The fields of a quantized CompressedWeight, with its codes and mask packed (`record()` rebuilds it)."""

    def __init__(self, record: CompressedWeight) -> None:
        self.lane = lane_bits(record.bits)
        self.codes = pack_lanes(record.codes, self.lane)
        self.mask = None if record.mask is None else pack_lanes(record.mask, 1)
        # everything else of the record, without the two large tensors (kept by reference, unchanged)
        self._fields = {name: getattr(record, name) for name in record.__dataclass_fields__}
        self._fields.update(codes=None, mask=None)

    @staticmethod
    def holds(record: CompressedWeight) -> bool:
        """Plain quantized records pack; dial records (widths, orders, alternates) stay as they are."""
        return record.quantized and record.dial is None and not record.alternates and record.order is None

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The tensors to register as the module's buffers (so they follow it between devices). Float16
        scales and zero points are held as their int16 bit patterns: a model cast to another dtype casts
        its floating buffers, and these must keep their exact values (float32 zero points likewise, as int32)."""
        return {"packed_codes": self.codes, "packed_mask": self.mask, "packed_scales": _bits(self._fields["scales"]),
                "packed_zeros": _bits(self._fields["zeros"])}  # fmt: skip

    def record(self, buffers: dict[str, torch.Tensor | None]) -> CompressedWeight:
        """The exact record, from the module's (possibly moved) buffers."""
        numel = self._fields["shape"][0] * self._fields["shape"][1]
        shape = self._fields["shape"]
        codes = unpack_lanes(buffers["packed_codes"], self.lane, numel).view(shape)
        mask = buffers["packed_mask"]
        mask = None if mask is None else unpack_lanes(mask, 1, numel).view(shape).bool()
        scales, zeros = _float(buffers["packed_scales"]), _float(buffers["packed_zeros"])
        return CompressedWeight(**{**self._fields, "codes": codes, "mask": mask, "scales": scales, "zeros": zeros})

    @staticmethod
    def nbytes(buffers: dict[str, torch.Tensor | None]) -> int:
        return sum(t.numel() * t.element_size() for t in buffers.values() if t is not None)


def record_memory(record: CompressedWeight) -> int:
    """Bytes a record's tensors take in memory (codes and masks a byte each), its alternates included."""
    total = 0
    for name in record.__dataclass_fields__:
        value = getattr(record, name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, torch.Tensor):
                total += item.numel() * item.element_size()
            elif isinstance(item, CompressedWeight):
                total += record_memory(item)
    return total


_BIT_VIEWS = {torch.float16: torch.int16, torch.float32: torch.int32}
_FLOAT_VIEWS = {bits: dtype for dtype, bits in _BIT_VIEWS.items()}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(_BIT_VIEWS[tensor.dtype]) if tensor.dtype in _BIT_VIEWS else tensor


def _float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(_FLOAT_VIEWS[tensor.dtype]) if tensor.dtype in _FLOAT_VIEWS else tensor
