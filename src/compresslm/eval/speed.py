"""Speed and memory of a model under a stated workload, with warm-up, repeats, medians and spread.

For each batch size: prefill (one forward over `prompt_tokens` random token ids per sequence,
filling the KV cache) and decode (`new_tokens` single-token steps reading that cache, greedy).
Reported per batch size: prefill and decode tokens/s (median, min, max over the repeats), time
to first token (the prefill's wall time), and the KV cache's bytes at the end of decoding,
measured from the cache tensors. Also: the model's bytes in memory (parameters and buffers), the
process's peak RSS, the peak CUDA memory on CUDA, and energy per token where the platform
exposes counters (Intel RAPL under /sys/class/powercap, NVML on NVIDIA GPUs) — otherwise
recorded as absent, never estimated. Timings are wall-clock on a machine that may be shared;
compare ratios measured in one run.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compresslm.errors import ProtocolError
from compresslm.models.loaded import LoadedModel
from compresslm.versions import versions

RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


@dataclass
class SpeedResult:
    per_batch: dict[str, dict]
    model_bytes_in_memory: int
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    energy: str
    protocol: dict = field(repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _energy_counter(device: torch.device):
    """A function returning joules so far, or None where the platform exposes no counter."""
    if device.type == "cuda":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
        except Exception:  # no pynvml, or a GPU without the counter
            return None
    if RAPL.exists():
        try:
            int(RAPL.read_text())
            return lambda: int(RAPL.read_text()) / 1e6
        except (OSError, ValueError):  # present but unreadable without privileges
            return None
    return None


def cache_bytes(cache: object) -> int:
    """Bytes of every tensor held by a KV cache object (any transformers cache class or legacy tuples)."""
    seen: set[int] = set()
    total = 0

    def visit(value: object, depth: int = 0) -> None:
        nonlocal total
        if depth > 6:
            return
        if torch.is_tensor(value):
            if value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth + 1)
        elif hasattr(value, "__dict__"):
            for item in vars(value).values():
                visit(item, depth + 1)

    visit(cache)
    return total


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


@torch.inference_mode()
def measure_speed(
    lm: LoadedModel,
    *,
    prompt_tokens: int = 512,
    new_tokens: int = 64,
    batch_sizes: tuple[int, ...] = (1,),
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    kv_config=None,
) -> SpeedResult:
    """Measure prefill/decode throughput and memory of `lm` on its current device.

    `kv_config` (a `compresslm.kv.cache.KVQuantConfig`) runs with the quantized KV cache.
    """
    from compresslm.kv.cache import make_cache

    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1 or warmup < 0 or not batch_sizes:
        raise ProtocolError("prompt_tokens, new_tokens and repeats must be positive, warmup >= 0, batch sizes given")
    model, device = lm.model.eval(), lm.device
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise ProtocolError(f"{prompt_tokens} + {new_tokens} tokens exceed the model's {limit} positions")
    vocab = model.config.vocab_size
    energy = _energy_counter(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator().manual_seed(seed)
    per_batch = {}
    for batch in batch_sizes:
        prompt = torch.randint(0, vocab, (batch, prompt_tokens), generator=generator).to(device)
        prefill, decode, joules, kv = [], [], [], 0
        for run in range(warmup + repeats):
            start_energy = energy() if energy else None
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=prompt, past_key_values=make_cache(model, kv_config), use_cache=True)
            _sync(device)
            t1 = time.perf_counter()
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(dim=-1)
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(dim=-1)
            _sync(device)
            t2 = time.perf_counter()
            if run >= warmup:
                prefill.append(t1 - t0)
                decode.append(t2 - t1)
                kv = cache_bytes(cache)
                if energy:
                    joules.append((energy() - start_energy) / (batch * (prompt_tokens + new_tokens)))
            del out, cache
        per_batch[str(batch)] = {
            "prefill_tokens_per_s": _summary([batch * prompt_tokens / t for t in prefill]),
            "decode_tokens_per_s": _summary([batch * new_tokens / t for t in decode]),
            "time_to_first_token_s": _summary(prefill),
            "kv_cache_bytes": kv,
            **({"joules_per_token": _summary(joules)} if joules else {}),
        }
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    protocol = {
        "workload": f"random token ids; prefill {prompt_tokens} tokens, then {new_tokens} greedy decode steps",
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "batch_sizes": list(batch_sizes),
        "warmup_runs": warmup,
        "timed_runs": repeats,
        "statistic": "median, min and max over the timed runs",
        "device": str(device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "kv_cache": kv_config.describe() if kv_config is not None else "full precision (transformers DynamicCache)",
        "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model": lm.describe(),
        "versions": versions(),
    }
    if device.type == "cuda":
        protocol["gpu"] = torch.cuda.get_device_name(device)
    return SpeedResult(
        per_batch=per_batch,
        model_bytes_in_memory=model_bytes,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_cuda_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        energy=("measured: " + ("NVML" if device.type == "cuda" else "RAPL"))
        if energy
        else "absent: no energy counter exposed on this platform (no RAPL under /sys/class/powercap, no NVML)",
        protocol=protocol,
    )
