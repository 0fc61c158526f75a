"""One llm-compressor point, run inside llm-compressor's own virtual environment.

Called by `benchmarks/llmcompressor_anchor.py` with `PYTHONPATH=src` so that the evaluation is
compresslm's own perplexity function: same windows, same protocol, same code as our rows. The
calibration windows are the exact token tensors our engine uses (saved by the orchestrator).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def scheme(bits: int, group: int, symmetric: bool) -> dict:
    return {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": symmetric,
                "strategy": "group",
                "group_size": group,
            },
        }
    }


def allow_awq_without_accelerator() -> str | None:
    """llm-compressor 0.14's AWQ pins its cached activations before each grid search, and
    `Tensor.pin_memory()` raises "Cannot access accelerator device" on a machine without one.
    Pinning only speeds host-to-GPU copies, so on a CPU-only machine it is made a no-op; the
    result row says so. Returns that label, or None where nothing was changed."""
    if torch.cuda.is_available():
        return None
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    return "IntermediatesCache.pin_memory made a no-op (no accelerator here; pinning only speeds GPU copies)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--calib", required=True, help=".pt file with a [n, length] tensor of token ids")
    parser.add_argument("--method", choices=["gptq", "awq"], required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--limit", type=int, default=40)
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compresslm.eval.perplexity import perplexity
    from compresslm.models.loaded import LoadedModel
    from compresslm.versions import versions

    windows = torch.load(args.calib)
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = scheme(args.bits, args.group, args.symmetric)
    if args.method == "gptq":
        modifier = GPTQModifier(config_groups=config, ignore=["lm_head"], block_size=128, dampening_frac=0.01)
    else:
        modifier = AWQModifier(config_groups=config, ignore=["lm_head"])
    patched = allow_awq_without_accelerator() if args.method == "awq" else None
    started = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[modifier],
        num_calibration_samples=windows.shape[0],
        max_seq_length=windows.shape[1],
        shuffle_calibration_samples=False,
        pipeline="sequential",
    )
    seconds = time.perf_counter() - started
    lm = LoadedModel.from_module(model, tokenizer, name=f"llm-compressor {args.method}")
    result = perplexity(lm, "wikitext2", ctx=2048, limit=args.limit, show_progress=False)
    import llmcompressor

    print(json.dumps({
        "tool": f"llm-compressor {llmcompressor.__version__}",
        "method": args.method,
        "bits": args.bits,
        "group_size": args.group,
        "symmetric": args.symmetric,
        "ppl": result.ppl,
        "compress_seconds": seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "eval_protocol": result.protocol,
        "versions": versions(),
        "patch": patched,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
