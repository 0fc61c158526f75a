"""A quantized KV cache (KIVI-style) that plugs into transformers' cache interface.

Keys are quantized per channel over groups of `group_size` tokens (each channel of each head
gets a scale and minimum per group of tokens: keys have outlier *channels*); values per token,
in groups of `value_group` channels (within a head, or spanning heads when larger than
head_dim). Tokens are held in full precision until a whole group of `group_size` tokens older
than the recent `window` has accumulated; then that group is quantized, bit-packed and its
full-precision copy dropped. Attention reads the dequantized history plus the full-precision
recent tokens.

`outliers` > 0 keeps that fraction of each key group's largest-magnitude entries in float16
(with int16 positions within the group) and quantizes the rest over the narrower remaining range (the
dense-and-sparse idea of KVQuant). `pre_rope` quantizes keys before the rotary embedding (also
KVQuant): keys enter the cache rotated, are rotated back by their positions' angles (computed
by the model's own rotary module, not stored), quantized per channel where the channels'
scales are stable, and rotated again when read.

`sink` keeps the first tokens of the sequence in full precision (attention sinks: the first
token draws much of every head's attention and its key is unlike the others', so quantizing it
with its neighbours costs both it and them). They take the start of the first group, which is
shorter by as much, so groups stay aligned to absolute positions.

`rotate` applies a Hadamard rotation along each head's channels before quantizing (keys and
values) and undoes it after dequantizing (QuaRot): outlier channels are spread over all channels.
It pairs with `key_axis="token"` (keys quantized per token, like values), since after the rotation
no channel stands out for per-channel scales to exploit.

Tokens not (yet) quantized, the sink, the recent window and a group still filling, are held in
16 bits (float16 when the model runs in float32), as the float16 cache the bytes are compared
with would hold them; `full_precision="model"` keeps the model's own dtype instead.

The cache really stores packed integers: `nbytes()` sums its tensors (codes, scales, minimums,
outliers, full-precision tokens) and is what every report calls KV bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from compresslm.errors import CompressLMError, UnsupportedArchitectureError
from compresslm.formats.packing import pack_lastdim, unpack_lastdim
from compresslm.quant.rotation import rotate_last


@dataclass(frozen=True)
class KVQuantConfig:
    bits: int = 4
    group_size: int = 128  # tokens per key group (per-channel quantization)
    value_group: int = 64  # channels per value group (per-token quantization); may span KV heads
    window: int = 0  # most recent tokens kept in full precision
    outliers: float = 0.0  # fraction of each key group kept in float16
    value_bits: int | None = None  # values' bits when they differ from the keys'
    pre_rope: bool = False  # quantize keys before the rotary embedding
    rotate: bool = False  # Hadamard-rotate each head's channels before quantizing (keys and values)
    key_axis: str = "channel"  # "channel": per-channel over groups of tokens (KIVI); "token": like values
    sink: int = 0  # first tokens of the sequence kept in full precision
    full_precision: str = "16bit"  # unquantized tokens: "16bit" (float16 for a float32 model) or "model"

    def __post_init__(self) -> None:
        for name in ("bits", "value_bits"):
            value = getattr(self, name)
            if value is not None and not 2 <= value <= 8:
                raise CompressLMError(f"KV cache {name} must be 2 to 8 (16 = not quantized), got {value}")
        if self.group_size < 1 or self.group_size % 8:
            raise CompressLMError(f"KV group_size must be a positive multiple of 8 tokens, got {self.group_size}")
        if self.value_group < 8 or self.value_group % 8:
            raise CompressLMError(f"KV value_group must be a positive multiple of 8 channels, got {self.value_group}")
        if self.window < 0:
            raise CompressLMError(f"KV window must be >= 0 tokens, got {self.window}")
        if self.sink < 0 or self.sink % 8 or self.sink >= self.group_size:
            raise CompressLMError(
                f"KV sink must be a multiple of 8 tokens below group_size {self.group_size}, got {self.sink}"
            )
        if not 0.0 <= self.outliers < 0.5:
            raise CompressLMError(f"KV outliers must be a fraction in [0, 0.5), got {self.outliers}")
        if self.full_precision not in ("16bit", "model"):
            raise CompressLMError(f"KV full_precision must be '16bit' or 'model', got {self.full_precision!r}")
        if self.key_axis not in ("channel", "token"):
            raise CompressLMError(f"KV key_axis must be 'channel' or 'token', got {self.key_axis!r}")
        if self.outliers and self.key_axis == "token":
            raise CompressLMError("KV outliers are kept per key group along tokens: use key_axis='channel'")

    @property
    def v_bits(self) -> int:
        return self.value_bits or self.bits

    def describe(self) -> str:
        if self.key_axis == "channel":
            text = f"K{self.bits} per-channel/{self.group_size} tok"
        else:
            text = f"K{self.bits} per-token/{self.value_group} ch"
        text += f", V{self.v_bits} per-token/{self.value_group} ch"
        if self.window:
            text += f", {self.window} recent tokens full precision"
        if self.sink:
            text += f", first {self.sink} tokens full precision"
        if self.outliers:
            text += f", {100 * self.outliers:g}% key outliers float16"
        if self.pre_rope:
            text += ", keys pre-RoPE"
        if self.rotate:
            text += ", Hadamard-rotated heads"
        return text

    def to_dict(self) -> dict:
        return asdict(self)


def _quantize(x: torch.Tensor, bits: int, dim: int) -> dict:
    """Asymmetric min/scale quantization of `x` reducing over `dim`; codes packed along the last dim."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-8).to(torch.float16)
    lo = lo.to(torch.float16)
    codes = torch.round((x - lo.float()) / scale.float()).clamp(0, (1 << bits) - 1).to(torch.uint8)
    return {"codes": pack_lastdim(codes, bits), "scale": scale, "min": lo}


def _dequantize(q: dict, bits: int) -> torch.Tensor:
    return unpack_lastdim(q["codes"], bits).float() * q["scale"].float() + q["min"].float()


class QuantizedKVLayer(CacheLayerMixin):
    """One attention layer's cache: quantized groups of old tokens plus full-precision recent ones."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, config: KVQuantConfig, rotary=None):
        super().__init__()
        self.config = config
        self.rotary = rotary  # the model's rotary embedding module, for pre-RoPE keys
        self.key_groups: list[dict] = []
        self.value_groups: list[dict] = []
        self.keys = self.values = None
        self.sink_keys = self.sink_values = None
        self.quantized_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        head_dim = key_states.shape[-1]
        width = key_states.shape[1] * head_dim  # a token's values across all KV heads
        self.value_group = min(self.config.value_group, width)  # a group may span heads
        if head_dim % 8 or (width % self.value_group if self.value_group > head_dim else head_dim % self.value_group):
            raise CompressLMError(
                f"value_group {self.value_group} must divide head_dim {head_dim} (or the {width} channels of all "
                "heads) and head_dim must be a multiple of 8"
            )
        if self.config.rotate and head_dim & (head_dim - 1):
            raise CompressLMError(f"a Hadamard-rotated KV cache needs a power-of-two head_dim, got {head_dim}")
        store = self.dtype
        if self.config.full_precision == "16bit" and key_states.element_size() > 2:
            store = torch.float16
        self.keys = self.sink_keys = key_states[..., :0, :].to(store)
        self.values = self.sink_values = value_states[..., :0, :].to(store)
        self.is_initialized = True

    def _quantize_keys(self, keys: torch.Tensor) -> dict:
        if self.config.rotate:
            keys = rotate_last(keys)
        if self.config.key_axis == "token":
            return self._quantize_tokens(keys, self.config.bits)
        # keys [B, H, G, D]: per channel over the G tokens, codes packed along the token axis
        x = keys.float().transpose(-1, -2)  # [B, H, D, G]
        outliers = None
        if self.config.outliers > 0:
            flat = x.reshape(*x.shape[:2], -1)
            count = max(1, int(self.config.outliers * flat.shape[-1]))
            index = flat.abs().topk(count, dim=-1).indices
            index_dtype = torch.int16 if flat.shape[-1] <= 32767 else torch.int32  # positions within the group
            outliers = {"index": index.to(index_dtype), "value": flat.gather(-1, index).to(torch.float16)}
            kept = torch.ones_like(flat, dtype=torch.bool).scatter_(-1, index, False)
            median = flat.median(dim=-1, keepdim=True).values
            x = torch.where(kept, flat, median).reshape(x.shape)  # outliers leave the range
        q = _quantize(x, self.config.bits, dim=-1)
        if outliers is not None:
            q["outliers"] = outliers
        return q

    def _dequantize_keys(self, q: dict) -> torch.Tensor:
        if self.config.key_axis == "token":
            x = self._dequantize_tokens(q, self.config.bits)
        else:
            x = _dequantize(q, self.config.bits)  # [B, H, D, G]
            if "outliers" in q:
                flat = x.reshape(*x.shape[:2], -1)
                flat.scatter_(-1, q["outliers"]["index"].long(), q["outliers"]["value"].float())
                x = flat.reshape(x.shape)
            x = x.transpose(-1, -2)
        return rotate_last(x) if self.config.rotate else x

    def _quantize_values(self, values: torch.Tensor) -> dict:
        return self._quantize_tokens(rotate_last(values) if self.config.rotate else values, self.config.v_bits)

    def _dequantize_values(self, q: dict) -> torch.Tensor:
        x = self._dequantize_tokens(q, self.config.v_bits)
        return rotate_last(x) if self.config.rotate else x

    def _quantize_tokens(self, states: torch.Tensor, bits: int) -> dict:
        """Per-token quantization of [B, H, T, D] states in groups of value_group channels."""
        b, h, t, d = states.shape
        tokens = states.float().transpose(1, 2).reshape(b, t, h * d)  # each token's channels, head after head
        groups = tokens.reshape(b, t, h * d // self.value_group, self.value_group)
        return _quantize(groups, bits, dim=-1)

    def _dequantize_tokens(self, q: dict, bits: int) -> torch.Tensor:
        x = _dequantize(q, bits)  # [B, T, groups, value_group]
        b, t = x.shape[:2]
        return x.reshape(b, t, self.keys.shape[1], -1).transpose(1, 2)

    def _rope(self, keys: torch.Tensor, start: int, inverse: bool) -> torch.Tensor:
        """Rotate keys at positions start.. by their RoPE angles (or back, with `inverse`)."""
        positions = torch.arange(start, start + keys.shape[-2], device=keys.device)[None]
        cos, sin = self.rotary(keys, positions)
        cos, sin = cos[:, None].float(), sin[:, None].float()
        x = keys.float()
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos - rotated * sin if inverse else x * cos + rotated * sin

    def _history(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [self._dequantize_keys(q) for q in self.key_groups]
        values = [self._dequantize_values(q) for q in self.value_groups]
        history_k = torch.cat([self.sink_keys.float(), *keys, self.keys.float()], dim=-2)
        if self.config.pre_rope and history_k.shape[-2]:
            history_k = self._rope(history_k, 0, inverse=False)
        return history_k.to(self.dtype), torch.cat([self.sink_values.float(), *values, self.values.float()], dim=-2).to(
            self.dtype
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        history_k, history_v = self._history()
        out_k = torch.cat([history_k, key_states], dim=-2)
        out_v = torch.cat([history_v, value_states], dim=-2)
        if self.config.pre_rope:
            key_states = self._rope(key_states, self.get_seq_length(), inverse=True).to(self.dtype)
        self.keys = torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.values.dtype)], dim=-2)
        missing = self.config.sink - self.sink_keys.shape[-2]
        if missing > 0:  # the sequence's first tokens stay in full precision for good
            self.sink_keys = torch.cat([self.sink_keys, self.keys[..., :missing, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, self.values[..., :missing, :]], dim=-2)
            self.keys, self.values = self.keys[..., missing:, :], self.values[..., missing:, :]
        # groups align to absolute positions: the sink takes the first tokens of the first group
        g = self.config.group_size - (self.config.sink if self.quantized_tokens == 0 else 0)
        while self.keys.shape[-2] >= self.config.window + g:  # the oldest full group leaves full precision
            self.key_groups.append(self._quantize_keys(self.keys[..., :g, :]))
            self.value_groups.append(self._quantize_values(self.values[..., :g, :]))
            self.keys, self.values = self.keys[..., g:, :].contiguous(), self.values[..., g:, :].contiguous()
            self.quantized_tokens += g
            g = self.config.group_size
        return out_k, out_v

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self.quantized_tokens + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.key_groups, self.value_groups = [], []
        self.keys = self.values = None
        self.sink_keys = self.sink_values = None
        self.quantized_tokens = 0
        self.is_initialized = False

    def nbytes(self) -> int:
        total = 0
        for q in [*self.key_groups, *self.value_groups]:
            total += sum(t.numel() * t.element_size() for k, t in q.items() if k != "outliers")
            if "outliers" in q:
                total += sum(t.numel() * t.element_size() for t in q["outliers"].values())
        if self.keys is not None:
            total += (self.keys.numel() + self.values.numel()) * self.keys.element_size()
            total += (self.sink_keys.numel() + self.sink_values.numel()) * self.sink_keys.element_size()
        return total


class QuantizedKVCache(Cache):
    """A transformers Cache whose every layer is a QuantizedKVLayer."""

    def __init__(self, num_layers: int, config: KVQuantConfig, rotary=None):
        if config.pre_rope and rotary is None:
            raise CompressLMError("pre-RoPE key quantization needs the model's rotary embedding module")
        super().__init__(layers=[QuantizedKVLayer(config, rotary) for _ in range(num_layers)])
        self.kv_config = config

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def check_kv_support(model: torch.nn.Module) -> None:
    """Refuse, before any compute, a model whose attention the quantized cache cannot hold."""
    text_config = model.config.get_text_config(decoder=True)
    layer_types = sorted(set(getattr(text_config, "layer_types", None) or ["full_attention"]))
    if set(layer_types) - {"full_attention"}:
        raise UnsupportedArchitectureError(
            f"the quantized KV cache supports full-attention layers only; {type(model).__name__} has "
            f"{', '.join(layer_types)} layers (sliding-window caches are not implemented)"
        )


def make_cache(model: torch.nn.Module, config: KVQuantConfig | None) -> Cache:
    """A quantized cache for `model` (or transformers' full-precision DynamicCache when config is None)."""
    from transformers import DynamicCache

    text_config = model.config.get_text_config(decoder=True)
    if config is None:
        return DynamicCache(config=text_config)
    check_kv_support(model)
    rotary = None
    if config.pre_rope:
        rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
        if rotary is None:
            raise CompressLMError(f"{type(model).__name__} has no rotary_emb module: pre-RoPE quantization needs one")
    return QuantizedKVCache(text_config.num_hidden_layers, config, rotary)


def fp16_kv_bytes(model: torch.nn.Module, tokens: int, batch: int = 1) -> int:
    """Bytes a float16 cache would take for `tokens` tokens: the baseline KV compression is measured against."""
    cfg = model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * batch * heads * head_dim * tokens * 2
