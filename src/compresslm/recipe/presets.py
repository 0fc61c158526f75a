"""Preset names: the common recipes by pattern (`w4-g64-gptq`, `2:4-sparsegpt+w4-gptq`, `dial`).

A preset name may end in `+emb8` or `+emb4` to also quantize the token embedding (and a tied
lm_head) group-wise with 8 or 4 bits, group 64: `w4-g64-gptq+emb8`; `-gptq` quantizes the output
head by GPTQ on the final hidden states instead of rounding it (`emb4-g32-sym-gptq`).

Quantization presets are patterns: `w<bits>[-g<group>]-<method>[-sym][-clip][-act|-noact][-awq]`, e.g.
`w4-gptq` (group 128, asymmetric, act-order with static groups: GPTQ's default here, as in
llm-compressor), `w3-g64-gptq-noact` (columns in their natural order, dynamic groups),
`w4-g64-awq` (AWQ scaling and clip search, then
rounding), `w4-g64-gptq-awq` (AWQ scaling, then GPTQ), `w8-rtn` (per-channel), `w4-g64-gptq-keepzeros`
(an already pruned checkpoint: its exact zeros are held as a mask, 2:4 where they form one, instead of
GPTQ's error feedback writing into them). W8A8 presets:
`w8a8-smoothquant` (per-token dynamic int8 activations), `w8a8-smoothquant-static` (per-tensor
static), `w8a8-rtn` (no smoothing). Activation quantization is simulated in float (PyTorch has no
int8 matmul kernel on this CPU path) and labelled so. `w8-rtn` and other names
without `-g` use group 128 for 2–4 bits and per-channel for 5–8 bits.

GGUF presets put the weights on exactly the grid of a llama.cpp type, so the GGUF export is lossless:
`gguf-<type>-<method>[flags]` with type q4_0, q5_0, q8_0 (symmetric, group 32; q4_0 and q5_0 with
llama.cpp's signed scales, `signed_scale`) or q4_1, q5_1
(asymmetric, group 32, scales with `offset_exact`), e.g. `gguf-q4_1-gptq`, `gguf-q4_0-awq`, or the
K-quants q2_k ... q6_k (sub-blocks of 16 or 32 whose scales, and offsets for q2_k, q4_k and q5_k, are
float16s per 256 columns times small integers, signed for q3_k and q6_k; rows that 256 does not
divide take llama.cpp's own fallback: Q5_0, Q5_1, Q8_0, Q4_0 for IQ4_NL), e.g. `gguf-q4_k-gptq`; the
flag `-refit` makes a K-quant's clip search round and refit by least squares (`quant.grid`), e.g.
`gguf-q2_k-gptq-wclip-refit`. The
embedding part `emb8-g32-sym` is Q8_0's grid (plain `emb8` is group 64, asymmetric); `emb4-g32-sym` is
Q4_0's (with its signed scales).

`rot+<preset>` rotates the residual stream (and each head's values) by a seeded random orthogonal
matrix folded into the weights before calibration (QuaRot; `rot-s<seed>` picks the draw), e.g.
`rot+w3-g64-gptq`; `w<bits>a<bits>` also quantizes each linear's input per token (simulated), e.g.
`rot+w4a8-g64-gptq`, `rot+w4a4-g64-gptq`; the flag `-sq` folds SmoothQuant's scales (α = 0.5) first,
e.g. `w4a8-g64-gptq-sq`.

Low-rank factorization presets remove a share of every linear layer's parameters by replacing it
with float16 factors: `<ratio%>-<svd|asvd|whitened>`, e.g. `20%-whitened` (SVD-LLM's truncation-aware
whitening), `30%-asvd`, `40%-svd`. They stand alone (the factors are not quantized).

Structured pruning parts remove whole structures before calibration, so the model becomes an
ordinary smaller one: `mlp<pct>` (that share of every MLP's channels), `heads<pct>` (of the query
heads, evenly per key/value group), `hidden<pct>` (of the residual stream's channels), `drop<n>` (the
n blocks that change the residual stream least), each with `-taylor` for first-order (gradient)
importance, e.g. `mlp50`, `drop8+mlp25`, `mlp50-taylor+w4-g64-gptq`. Consecutive width parts make one
stage. Alone they are written as a Hugging Face directory by `compresslm shrink`.
"""

from __future__ import annotations

import re

from compresslm.recipe.fields import RecipeError

_PRESET = re.compile(
    r"^w(?P<bits>[2-8])(?:a(?P<act>[4-8]))?(?:-g(?P<group>\d+))?-(?P<method>rtn|gptq|awq)(?P<flags>(?:-(?:sym|clip|wclip|act|noact|awq|keepzeros|sq))*)$"
)


SMOOTHQUANT_PRESETS = {
    # W8A8: SmoothQuant α = 0.5, per-channel symmetric int8 weights, per-token dynamic int8 activations.
    "w8a8-smoothquant": {"method": "rtn", "bits": 8, "granularity": "channel", "symmetric": True,
                         "smoothquant": True, "smoothquant_alpha": 0.5, "act_bits": 8, "act_granularity": "token"},
    "w8a8-smoothquant-static": {"method": "rtn", "bits": 8, "granularity": "channel", "symmetric": True,
                                "smoothquant": True, "smoothquant_alpha": 0.5, "act_bits": 8,
                                "act_granularity": "tensor"},
    "w8a8-rtn": {"method": "rtn", "bits": 8, "granularity": "channel", "symmetric": True, "act_bits": 8},
}  # fmt: skip


_GGUF_PRESET = re.compile(
    r"^gguf-q(?P<bits>[2-8])_(?P<kind>[01k])-(?P<method>rtn|gptq|awq)(?P<flags>(?:-(?:clip|wclip|refit|act|noact|awq|keepzeros))*)$"
)
_EMBEDDING_PRESET = re.compile(r"^emb(?P<bits>[48])(?:-g(?P<group>\d+))?(?P<sym>-sym)?(?P<gptq>-gptq)?$")
_KV_PRESET = re.compile(
    r"^kv(?P<bits>[2-8])(?:-g(?P<group>\d+))?(?:-w(?P<window>\d+))?(?:-s(?P<sink>\d+))?"
    r"(?P<pre>-pre)?(?P<rot>-rot)?(?P<kt>-kt)?$"
)
_LOWRANK_PRESET = re.compile(r"^lqer(?P<rank>\d+)(?P<plain>-plain)?$")
_ROTATE_PRESET = re.compile(r"^rot(?:-s(?P<seed>\d+))?$")
_FACTORIZE_PRESET = re.compile(r"^(?P<ratio>\d+(?:\.\d+)?)%-(?P<method>svd|asvd|whitened)$")
_WIDTH_PRESET = re.compile(r"^(?P<axis>mlp|heads|hidden)(?P<pct>\d+(?:\.\d+)?)(?P<taylor>-taylor)?$")
_DEPTH_PRESET = re.compile(r"^drop(?P<layers>\d+)(?P<taylor>-taylor)?$")
_DIAL_PRESET = re.compile(r"^dial(?:-g(?P<group>\d+))?(?P<rtn>-rtn)?(?P<shared>-shared)?$")
_PRUNE_PRESET = re.compile(
    r"^(?P<sparsity>\d+(?:\.\d+)?%|\d+:\d+)-(?P<method>magnitude|wanda|sparsegpt)(?P<flags>(?:-(?:layer|owl))*)$"
)


def _quantize_preset(part: str, match: re.Match) -> dict:
    bits = int(match["bits"])
    flags = set(filter(None, match["flags"].split("-")))
    stage: dict = {"method": match["method"], "bits": bits}
    if match["group"]:
        stage["group_size"] = int(match["group"])
    elif bits >= 5:
        stage["granularity"] = "channel"
    stage["symmetric"] = "sym" in flags
    stage["clip_search"] = "clip" in flags or "wclip" in flags
    if "wclip" in flags:  # each column's error weighted by its input's mean square (GPTQ's Hessian diagonal)
        stage["clip_weighted"] = True
    if "act" in flags or "noact" in flags:
        stage["act_order"] = "act" in flags
    stage["awq_scale"] = "awq" in flags
    if "keepzeros" in flags:
        stage["keep_zeros"] = True
    if match["act"]:  # simulated per-token activations (w4a8-g64-gptq)
        stage["act_bits"] = int(match["act"])
    if "sq" in flags:  # SmoothQuant's scales (α = 0.5) folded before quantizing
        stage.update(smoothquant=True, smoothquant_alpha=0.5)
    return stage


def _gguf_preset(match: re.Match) -> dict:
    """A llama.cpp type's grid: legacy types are group 32, `_0` symmetric, `_1` asymmetric with float16
    offsets; K-quants (`_k`) are their sub-blocks with scales on the super-block's lattice."""
    from compresslm.quant.grid import K_QUANTS, llamacpp_signed

    flags = match["flags"].split("-")
    refit = {"refit": True} if "refit" in flags else {}  # K-quants only: checked with the stage's other fields
    flags = "-".join(flag for flag in flags if flag != "refit")
    if match["kind"] == "k":
        kquant = f"q{match['bits']}_k"
        if kquant not in K_QUANTS:
            raise RecipeError(f"K-quant grids so far: {', '.join(sorted(K_QUANTS))}; not {kquant}")
        kind = K_QUANTS[kquant]
        name = f"w{kind.bits}-g{kind.group_size}-{match['method']}{flags}{'-sym' if kind.symmetric else ''}"
        stage = _quantize_preset(name, _PRESET.match(name))
        return {**stage, "kquant": kquant, "signed_scale": kind.symmetric, **refit}
    if match["bits"] not in "458":
        asked = f"q{match['bits']}_{match['kind']}"
        raise RecipeError(f"GGUF's legacy types are q4_0, q4_1, q5_0, q5_1 and q8_0; not {asked}")
    bits, symmetric = int(match["bits"]), match["kind"] == "0"
    if bits == 8 and not symmetric:
        raise RecipeError("GGUF has no q8_1 weight type; use gguf-q8_0-<method>")
    name = f"w{bits}-g32-{match['method']}{flags}{'-sym' if symmetric else ''}"
    stage = {**_quantize_preset(name, _PRESET.match(name)), **refit}
    if symmetric:
        return {**stage, "signed_scale": True} if llamacpp_signed(bits) else stage
    return {**stage, "offset_exact": True}


def _dial_preset(match: re.Match) -> dict:
    """3, 4 and 8 bits in one artifact. With GPTQ, 3 bits get codes of their own unless `-shared`.

    One code cannot serve GPTQ's 3 and 4 bits at once (`benchmarks/results/nested_layer.md`), so
    the 8-bit codes nest 4 bits only, weighted 1 : 0.002 (the weights chosen there). Rounding
    (`-rtn`) nests all three for free: its 3-bit cells are exactly pairs of 4-bit cells.
    With GPTQ, sparse settings at 8 bits come from a nested-sparse plane (`sparse.nested`) tuned
    for 50/60/70/80 %, weighted 1/0.5/0.5/0.2 (`benchmarks/results/nested_sparse_layer.md`),
    except 50 and 70 %, pruned on their own by SparseGPT, where the shared plane fell furthest
    behind a dedicated SparseGPT (`benchmarks/results/sweep_full`), its per-layer excess
    compounding over the layers.
    """
    stage = {"method": "rtn" if match["rtn"] else "gptq", "bits": 8, "group_size": int(match["group"] or 64)}
    if match["rtn"] or match["shared"]:
        return {**stage, "nested_widths": [3, 4, 8]}
    return {**stage, "nested_widths": [4, 8], "nested_priorities": [1.0, 0.002], "separate_widths": [3],
            "dial_sparsity": [0.5, 0.6, 0.7, 0.8], "dial_sparsity_priorities": [1.0, 0.5, 0.5, 0.2],
            "separate_sparsity": [0.5, 0.7]}  # fmt: skip


def _prune_preset(match: re.Match) -> dict:
    flags = set(filter(None, match["flags"].split("-")))
    stage: dict = {"type": "prune", "method": match["method"], "sparsity": match["sparsity"]}
    if "layer" in flags:
        stage["scope"] = "layer"
    if "owl" in flags:
        stage["allocation"] = "owl"
    return stage


def preset_dict(name: str) -> dict:
    """The recipe (as data) for a preset name: parts joined by '+', applied in the order written.

    Parts: a quantization preset (`w4-g64-gptq`, see the module docstring), a pruning preset
    `<ratio%|N:M>-<magnitude|wanda|sparsegpt>[-layer][-owl]` (`50%-wanda`, `2:4-sparsegpt`,
    `70%-wanda-owl`), a W8A8 preset, `emb8`/`emb4`, or a KV-cache part
    `kv<bits>[-g<tokens>][-w<window>][-s<sink tokens>][-pre][-rot][-kt]` (`w4-g64-gptq+kv4`,
    `kv2-g64-w128`, `kv4-g128-s4-pre`; see KVCacheStage), or a low-rank correction
    `lqer<rank>[-plain]` after the others (`w4-g64-gptq+lqer16`: W ≈ Q + L·R fitted to the layer's
    output; `-plain` fits the weights). `2:4-sparsegpt+w4-gptq` prunes, then quantizes with the
    mask held; `w4-gptq+50%-wanda` quantizes, then prunes the quantized weights.
    """
    lowered = name.lower()
    stages: list[dict] = []
    embedding = None
    for part in lowered.split("+"):
        if match := _EMBEDDING_PRESET.match(part):
            embedding = {"type": "quantize_embedding", "bits": int(match["bits"]),
                         "group_size": int(match["group"] or 64), "symmetric": bool(match["sym"])}  # fmt: skip
            from compresslm.quant.grid import llamacpp_signed

            if match["sym"] and llamacpp_signed(int(match["bits"])):
                embedding["signed_scale"] = True
            if match["gptq"]:
                embedding["method"] = "gptq"
        elif match := _GGUF_PRESET.match(part):
            stages.append(_gguf_preset(match))
        elif match := _KV_PRESET.match(part):
            kv = {"type": "kv_cache", "bits": int(match["bits"])}
            sizes = (("group_size", match["group"]), ("window", match["window"]), ("sink", match["sink"]))
            kv.update({k: int(v) for k, v in sizes if v})
            kv.update(pre_rope=bool(match["pre"]), rotate=bool(match["rot"]))
            if match["kt"]:
                kv["key_axis"] = "token"
            stages.append(kv)
        elif match := _ROTATE_PRESET.match(part):  # the residual stream rotated first (QuaRot)
            stages.append({"type": "rotate", **({"seed": int(match["seed"])} if match["seed"] else {})})
        elif match := _FACTORIZE_PRESET.match(part):  # the layers replaced by their factors
            stages.append({"type": "lowrank", "method": match["method"], "ratio": float(match["ratio"]) / 100})
        elif match := _LOWRANK_PRESET.match(part):  # a rank-r correction of the error the stages before left
            stage = {"type": "lowrank_compensation", "rank": int(match["rank"])}
            stages.append({**stage, "whiten": False} if match["plain"] else stage)
        elif match := _WIDTH_PRESET.match(part):  # structures removed: one width stage for consecutive parts
            share, score = float(match["pct"]) / 100, "taylor" if match["taylor"] else "activation"
            if not (stages and stages[-1].get("type") == "prune_width" and match["axis"] not in stages[-1]):
                stages.append({"type": "prune_width", "score": score})
            elif stages[-1]["score"] != score:
                raise RecipeError(f"preset '{name}': the width parts of one stage need the same score (-taylor or not)")
            stages[-1][match["axis"]] = share
        elif match := _DEPTH_PRESET.match(part):
            stages.append({"type": "prune_depth", "layers": int(match["layers"]),
                           "score": "taylor" if match["taylor"] else "cosine"})  # fmt: skip
        elif part in SMOOTHQUANT_PRESETS:
            stages.append(dict(SMOOTHQUANT_PRESETS[part]))
        elif match := _DIAL_PRESET.match(part):  # one artifact, 3/4/8 bits (see compresslm.dial)
            stages.append(_dial_preset(match))
        elif match := _PRUNE_PRESET.match(part):
            stages.append(_prune_preset(match))
        elif match := _PRESET.match(part):
            stages.append(_quantize_preset(part, match))
        else:
            raise RecipeError(
                f"unknown preset '{name}' (cannot read '{part}'); presets look like w4-gptq, w4-g64-gptq, "
                "w3-g32-gptq-act, w4-g64-awq, w4-g64-gptq-awq, w8-rtn, w8a8-smoothquant, 50%-wanda, "
                "2:4-sparsegpt, 2:4-sparsegpt+w4-gptq, 70%-wanda-owl, dial, dial-shared, dial-g32-rtn, "
                "w4-g64-gptq+lqer16, gguf-q4_1-gptq, 20%-whitened, mlp50, drop8+heads33, "
                "with +emb8/+emb4/+emb8-g32-sym for the embedding "
                "(or give a YAML/JSON recipe file)"
            )
    if not stages:
        raise RecipeError(f"preset '{name}' names no quantization or pruning stage")
    kinds = [stage.get("type", "quantize") for stage in stages]
    if "lowrank_compensation" in kinds and not {"quantize", "prune"} & set(kinds):
        raise RecipeError(f"preset '{name}': a low-rank correction (lqer) needs a quantization or pruning part")
    if "lowrank_compensation" in kinds and any(stage.get("nested_widths") for stage in stages):
        raise RecipeError(f"preset '{name}': the dial's nested widths do not combine with a low-rank correction")
    if "lowrank" in kinds and len(stages) > 1 + kinds.count("kv_cache"):
        raise RecipeError(
            f"preset '{name}': a low-rank factorization stands alone (its factors are not quantized "
            "or pruned); give a recipe file with targets to mix it with other stages on other layers"
        )
    if kinds.count("lowrank_compensation") > 1:
        raise RecipeError(f"preset '{name}' has more than one low-rank part")
    if "prune" in kinds and any(stage.get("nested_widths") for stage in stages):
        raise RecipeError(f"preset '{name}': the dial's nested widths do not combine with a pruning stage yet")
    if kinds.count("prune") > 1 or kinds.count("quantize") > 1 or kinds.count("kv_cache") > 1:
        raise RecipeError(f"preset '{name}' has more than one pruning, quantization or KV-cache part")
    return {"name": lowered, "stages": ([embedding] if embedding else []) + stages}
