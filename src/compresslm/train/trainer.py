"""Fine-tuning for compressibility: QAT, randomized precision, gradual pruning, with distillation.

The student is the model with its block linears replaced by `FakeQuantLinear` (when the recipe
quantizes or prunes); the teacher is a frozen copy of the model as loaded (or another model, such
as the uncompressed original when a compressed container is fine-tuned). The loss is the KL
divergence from the teacher's next-token distribution to the student's (distillation keeps the
fine-tune from drifting), plus `ce_weight` × the language-modelling loss on the training text.

* QAT: every step at the recipe's width, through the STE grid with learned steps.
* Randomized precision: each step draws every layer's width from `widths`, so one checkpoint
  is trained for all of them; the run exports one container per width, each on the steps learned
  for that width (`model-w4.clm`, `model-w3.clm`, ...), beside the float weights.
* Learned widths (the rate term): with `rate_weight` λ > 0 each layer learns a distribution over
  `widths` (see `FakeQuantLinear`) and the loss adds λ × the expected bits per linear weight of
  the container the run would write; at `fix_widths_at` of the run every layer is fixed at its
  most probable width and trains on as QAT. λ is the one knob that traces a frontier: the run
  exports a mixed-width container with its learned steps.
* Gradual magnitude pruning: every `prune_every` steps the masks are recomputed at the sparsity
  of the schedule (cubic, linear or cosine) until `prune_end` of the run, then held.

Training text: windows drawn like calibration windows (C4 sample, WikiText-2 validation or a
file). A checkpoint (student, optimizer, step, random states) is written atomically every
`checkpoint_every` steps and a rerun resumes from it; the loss log is a CSV and a PNG. The
checkpoint is safetensors with its other fields as JSON (no pickle: a checkpoint planted in the
output directory is data, checked field by field before it is used).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from compresslm.data.calibration import calibration_windows
from compresslm.errors import CompressLMError, CorruptFileError, UnsupportedArchitectureError, reason_of
from compresslm.fileio import check_writable_dir, load_tensors, save_tensors
from compresslm.models.layout import discover_layout
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import save_model
from compresslm.progress import progress
from compresslm.recipe.fields import build_options, check_bits, check_group, choice
from compresslm.runtime.linear import replace_module
from compresslm.train.fake import FakeQuantLinear, magnitude_mask, prune_schedule


@dataclass
class TrainRecipe:
    name: str = "finetune"
    widths: list[int] = field(default_factory=list)  # empty: no quantization during training
    random_precision: bool = False
    group_size: int = 64
    learn_step: bool = True
    sparsity: float = 0.0
    nm: list[int] | None = None  # e.g. [2, 4]: N:M masks (applied from the start)
    dynamic_nm: bool = False  # re-choose the N:M masks every step (SR-STE), fixed at the end
    nm_decay: float = 2e-4  # with dynamic_nm: pull of the currently pruned weights towards zero
    lora_rank: int = 0  # > 0: frozen weights, a trained low-rank update per linear (merged at the end)
    hidden_weight: float = 0.0  # > 0: also distil every block's hidden states (normalized MSE)
    act_bits: int = 0  # > 0: inputs quantized per tensor with a learned clipping range
    rate_weight: float = 0.0  # > 0: learn each layer's width from `widths`, penalising expected bits/weight
    width_lr: float = 1e-2  # learning rate of the width logits (rate_weight > 0)
    fix_widths_at: float = 0.75  # fraction of the run after which each layer keeps its most probable width
    schedule: str = "cubic"
    prune_every: int = 10
    prune_end: float = 0.75
    distill: bool = True
    ce_weight: float = 0.0
    lr: float = 2e-5
    weight_decay: float = 0.0
    batch_size: int = 4
    seq_len: int = 256
    data: str = "c4"
    checkpoint_every: int = 50

    def validate(self) -> TrainRecipe:
        for bits in self.widths:
            choice("train recipe", "width", bits, (2, 3, 4, 5, 6, 8))
        check_group("train recipe", "group", self.group_size)
        if self.random_precision and len(self.widths) < 2:
            raise CompressLMError("train recipe: random_precision needs at least two widths")
        if not 0.0 <= self.sparsity < 1.0:
            raise CompressLMError(f"train recipe: sparsity={self.sparsity} is not allowed; choose 0 to <1")
        if self.nm is not None and not (len(self.nm) == 2 and 0 < self.nm[0] < self.nm[1]):
            raise CompressLMError(f"train recipe: nm={self.nm} is not allowed; use [N, M] with 0 < N < M")
        choice("train recipe", "schedule", self.schedule, ("cubic", "linear", "cosine"))
        check_bits("train recipe", self.act_bits, "act_bits", off=True)
        if self.dynamic_nm and self.nm is None:
            raise CompressLMError("train recipe: dynamic_nm needs an nm pattern such as [2, 4]")
        if self.lora_rank < 0 or self.nm_decay < 0 or self.hidden_weight < 0:
            raise CompressLMError("train recipe: lora_rank, nm_decay and hidden_weight must be >= 0")
        if self.hidden_weight > 0 and not self.distill:
            raise CompressLMError("train recipe: hidden_weight distils hidden states: it needs distill on")
        if not self.distill and self.ce_weight <= 0:
            raise CompressLMError("train recipe: with distill off, ce_weight must be positive (nothing to learn from)")
        if self.rate_weight < 0:
            raise CompressLMError(f"train recipe: rate_weight={self.rate_weight} must be >= 0")
        if self.rate_weight > 0 and (len(self.widths) < 2 or self.random_precision):
            raise CompressLMError(
                "train recipe: rate_weight learns each layer's width: it needs two or more widths "
                "and random_precision off"
            )
        if not 0.0 < self.fix_widths_at <= 1.0 or self.width_lr <= 0:
            raise CompressLMError("train recipe: fix_widths_at must be in (0, 1] and width_lr positive")
        if self.lr <= 0 or self.batch_size < 1 or self.seq_len < 2 or self.prune_every < 1:
            raise CompressLMError("train recipe: lr, batch_size, seq_len and prune_every must be positive")
        return self

    @property
    def compresses(self) -> bool:
        return bool(self.widths) or self.sparsity > 0 or self.nm is not None or self.lora_rank > 0 or self.act_bits > 0


TRAIN_PRESETS: dict[str, dict] = {
    "finetune": {},
    # after structured pruning: distil the smaller model towards the unpruned one (give it as the teacher)
    "heal": {"lr": 1e-4},
    "qat-w4": {"widths": [4]},
    "qat-w3": {"widths": [3]},
    "qat-w2": {"widths": [2]},
    "random-precision": {"widths": [8, 6, 4, 3], "random_precision": True},
    "gmp-50%": {"sparsity": 0.5},
    "gmp-70%": {"sparsity": 0.7},
    "nm-2:4": {"nm": [2, 4]},
    "cast-2:4": {"nm": [2, 4], "dynamic_nm": True},
    "learned-widths": {"widths": [8, 6, 4, 3, 2], "rate_weight": 0.05},
    "qat-w4a8": {"widths": [4], "act_bits": 8},
    "lora-qat-w4": {"widths": [4], "lora_rank": 16, "lr": 1e-4},
    "lora-qat-w3": {"widths": [3], "lora_rank": 16, "lr": 1e-4},
}


def train_recipe(spec: str | dict | TrainRecipe) -> TrainRecipe:
    """A TrainRecipe from a preset name, a YAML/JSON file, a dict or a TrainRecipe (validated)."""
    if isinstance(spec, TrainRecipe):
        return spec.validate()
    if isinstance(spec, str):
        if spec in TRAIN_PRESETS:
            return TrainRecipe(name=spec, **TRAIN_PRESETS[spec]).validate()
        path = Path(spec).expanduser()
        if not path.is_file():
            raise CompressLMError(f"unknown training recipe '{spec}'; presets: {', '.join(TRAIN_PRESETS)}, or a file")
        import yaml

        spec = {"name": path.stem, **(yaml.safe_load(path.read_text(encoding="utf-8")) or {})}
    return build_options(TrainRecipe, spec, "train recipe").validate()  # field names and types checked


def _wrap(lm: LoadedModel, recipe: TrainRecipe) -> list[FakeQuantLinear]:
    wrapped = []
    widths = tuple(recipe.widths) or (16,)
    for info in lm.layout.linears():
        if info.transposed or not isinstance(info.module, torch.nn.Linear):
            raise UnsupportedArchitectureError(
                f"{info.name}: training supports nn.Linear layers, not {type(info.module).__name__} "
                "(GPT-2 style transposed layers)"
            )
        dynamic = tuple(recipe.nm) if recipe.dynamic_nm else None
        module = FakeQuantLinear(info.module, widths, recipe.group_size, recipe.learn_step, dynamic, recipe.lora_rank,
                                 recipe.act_bits, learn_widths=recipe.rate_weight > 0)  # fmt: skip
        replace_module(lm.model, info.name, module)
        wrapped.append(module)
    return wrapped


def _densify(lm: LoadedModel) -> None:
    """A loaded container trains from its dequantized weights: each CompressedLinear becomes an
    nn.Linear holding exactly the weight it computes with (pruned weights stay zero until a mask
    recipe keeps them there)."""
    from compresslm.runtime.linear import CompressedLinear

    compressed = [(name, m) for name, m in lm.model.named_modules() if isinstance(m, CompressedLinear)]
    for name, module in compressed:  # all checked before any layer is replaced
        if module.act_bits:
            raise CompressLMError(f"{name}: training a container with activation quantization is not supported")
    for name, module in compressed:
        replace_module(lm.model, name, _plain_linear(module.dequantized(), module.bias))
    if compressed:
        lm.layout = discover_layout(lm.model)
        lm.changed()


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """An nn.Linear holding copies of `weight` [out, in] and `bias`, on the weight's device."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.to(weight.device)


def _unwrap(lm: LoadedModel, modules: dict[str, FakeQuantLinear]) -> None:
    """Back to nn.Linear with the trained (masked, LoRA-merged) float weights, ready for save_model or compress."""
    for name, module in modules.items():
        with torch.no_grad():
            module.refresh_dynamic_mask()  # a dynamic mask is fixed from the final weights
            weight = module.dense_weight() if module.mask is None else module.dense_weight() * module.mask
        replace_module(lm.model, name, _plain_linear(weight, module.bias))


def check_teacher_use(recipe: TrainRecipe) -> None:
    """A teacher only serves distillation: refuse one for a recipe that has it off (callers check this
    before loading anything)."""
    if not recipe.distill:
        raise CompressLMError(
            f"train recipe {recipe.name!r} has distill off: a teacher would not be used; drop it or turn distill on"
        )


def train(
    lm: LoadedModel,
    recipe: str | dict | TrainRecipe,
    steps: int,
    output: str | os.PathLike,
    *,
    seed: int = 0,
    show_progress: bool = True,
    teacher: LoadedModel | None = None,
) -> dict:
    """Train `lm` in place for `steps` steps; write the checkpoint directory `output`; return a summary.

    The distillation teacher is a frozen copy of `lm` as given unless `teacher` names another model
    (the uncompressed one, when `lm` is a compressed container to be fine-tuned: it must share the
    tokenizer's vocabulary). A container trains from its dequantized weights.
    """
    recipe = train_recipe(recipe)
    if steps < 1:
        raise CompressLMError(f"steps must be at least 1, got {steps}")
    if teacher is not None:  # checked before anything is written
        check_teacher_use(recipe)
        vocab = (lm.model.get_output_embeddings().out_features, teacher.model.get_output_embeddings().out_features)
        if vocab[0] != vocab[1]:
            raise CompressLMError(f"the teacher's vocabulary ({vocab[1]} tokens) differs from the model's ({vocab[0]})")
    _densify(lm)
    out = Path(output).expanduser()
    check_writable_dir(out, "output directory")
    _refuse_pickles(out)
    windows = calibration_windows(lm.tokenizer, recipe.data, steps * recipe.batch_size, recipe.seq_len, seed)
    if teacher is not None:  # a teacher implies distillation (refused above otherwise)
        teacher_net = teacher.model.to(lm.device).eval().requires_grad_(False)
    elif recipe.distill:
        teacher_net = copy.deepcopy(lm.model).eval().requires_grad_(False)
    else:
        teacher_net = None
    names = [info.name for info in lm.layout.linears()]
    modules = dict(zip(names, _wrap(lm, recipe), strict=True)) if recipe.compresses else {}
    model = lm.model.train()
    logits = [m.width_logits for m in modules.values() if m.width_logits is not None]
    width_ids = {id(q) for q in logits}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in width_ids]
    groups = [{"params": params}] + ([{"params": logits, "lr": recipe.width_lr, "weight_decay": 0.0}] if logits else [])
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    weights = sum(m.in_features * m.out_features for m in modules.values())
    fix_step = int(recipe.fix_widths_at * steps)
    rng = random.Random(seed)
    start, log_rows = 0, []
    checkpoint = out / CHECKPOINT
    if checkpoint.exists():
        start, log_rows = _load_checkpoint(checkpoint, model, optimizer, modules, rng, recipe, steps)
    bar = progress(steps, f"train {recipe.name}", unit="step", enabled=show_progress)
    bar.update(start)
    device = lm.device
    for step in range(start, steps):
        t0 = time.perf_counter()
        if recipe.random_precision:
            for module in modules.values():
                module.set_bits(rng.choice(recipe.widths))
        if logits and step >= fix_step:
            for module in modules.values():
                if module.mixing:
                    module.fix_width()
        sparsity = 0.0
        if recipe.dynamic_nm:
            for module in modules.values():
                module.refresh_dynamic_mask()
        elif recipe.nm is not None and step == 0:
            for module in modules.values():
                module.mask = magnitude_mask(module.weight, 0.0, tuple(recipe.nm))
        elif recipe.sparsity > 0:
            sparsity = prune_schedule(step, int(recipe.prune_end * steps), recipe.sparsity, recipe.schedule)
            if step % recipe.prune_every == 0 or step == int(recipe.prune_end * steps):
                for module in modules.values():
                    module.mask = magnitude_mask(module.weight, sparsity)
        batch = windows.windows[step * recipe.batch_size : (step + 1) * recipe.batch_size].to(device)
        hidden = recipe.hidden_weight > 0
        student = model(input_ids=batch, use_cache=False, output_hidden_states=hidden)
        logprobs = F.log_softmax(student.logits[:, :-1].float(), dim=-1)
        loss = torch.zeros((), device=device)
        kl = ce = float("nan")
        if teacher_net is not None:
            with torch.no_grad():
                reference = teacher_net(input_ids=batch, use_cache=False, output_hidden_states=hidden)
                target = F.log_softmax(reference.logits[:, :-1].float(), dim=-1)
            kl_t = F.kl_div(logprobs.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
            loss = loss + kl_t
            kl = float(kl_t.detach())
            if hidden:
                loss = loss + recipe.hidden_weight * _hidden_loss(student.hidden_states, reference.hidden_states)
        if recipe.dynamic_nm and recipe.nm_decay > 0:
            loss = loss + recipe.nm_decay * sum(m.pruned_decay() for m in modules.values())
        rate = float("nan")  # expected container bits per linear weight (learned widths only)
        if logits:
            rate_t = sum(m.expected_bits() for m in modules.values()) / weights
            loss = loss + recipe.rate_weight * rate_t
            rate = float(rate_t.detach())
        if recipe.ce_weight > 0 or teacher_net is None:
            ce_t = F.nll_loss(logprobs.flatten(0, 1), batch[:, 1:].flatten())
            loss = loss + recipe.ce_weight * ce_t
            ce = float(ce_t.detach())
        if not torch.isfinite(loss):
            raise CompressLMError(
                f"the training loss became {float(loss)} at step {step + 1}; lower the learning rate "
                f"(now {recipe.lr:g}) or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bits = sorted({m.bits for m in modules.values()}) if modules else [16]
        mixing = any(m.mixing for m in modules.values())
        log_rows.append({"step": step + 1, "loss": float(loss.detach()), "kl": kl, "ce": ce, "sparsity": sparsity,
                         "bits": "mixed" if mixing else "/".join(map(str, bits)),
                         "bits_per_weight": rate, "seconds": time.perf_counter() - t0})  # fmt: skip
        bar.update(1)
        bar.set_postfix(loss=f"{log_rows[-1]['loss']:.4f}")
        if (step + 1) % recipe.checkpoint_every == 0 and step + 1 < steps:
            _save_checkpoint(checkpoint, model, optimizer, modules, rng, log_rows, recipe, steps)
    bar.close()
    model.eval()
    exported = {}
    if logits:
        for module in modules.values():
            if module.mixing:  # fix_widths_at = 1: fixed only now
                module.fix_width()
        exported["widths"] = {name: m.bits for name, m in modules.items()}
        exported["linear_bits_per_weight"] = sum(m.record_bits(m.bits) for m in modules.values()) / weights
    if (len(recipe.widths) == 1 or logits) and modules:
        name = f"model-w{recipe.widths[0]}.clm" if len(recipe.widths) == 1 else "model-learned-widths.clm"
        exported["container"] = str(_export_qat_container(lm, modules, recipe, out / name))
    elif recipe.random_precision and modules:  # one container per width, each on its own learned steps
        containers = {}
        for bits in recipe.widths:
            for module in modules.values():
                module.set_bits(bits)
            containers[bits] = str(_export_qat_container(lm, modules, recipe, out / f"model-w{bits}.clm"))
        exported["containers"] = containers
    _unwrap(lm, modules)
    lm.layout = discover_layout(lm.model)  # the module tree is back to nn.Linear
    lm.changed()
    save_model(lm, None, out / "model")
    _write_log(log_rows, out)
    checkpoint.unlink(missing_ok=True)
    return {"recipe": dataclasses.asdict(recipe), "steps": steps, "model": str(out / "model"), **exported,
            "first_loss": log_rows[0]["loss"], "last_loss": log_rows[-1]["loss"],
            "log": str(out / "loss.csv")}  # fmt: skip


CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = 1
_PICKLES = ("checkpoint.pt", "checkpoint.pth", "checkpoint.bin")  # what older compresslm (or an attacker) left


def _refuse_pickles(out: Path) -> None:
    for name in _PICKLES:
        if (out / name).exists():
            raise CompressLMError(
                f"{out / name} is a pickle checkpoint (written by compresslm before 0.2, or planted); "
                "compresslm never reads pickles: delete it, or train into another output directory"
            )


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     modules: dict[str, FakeQuantLinear], rng: random.Random, log_rows: list[dict],
                     recipe: TrainRecipe, steps: int) -> None:  # fmt: skip
    """The run's state as safetensors (model, optimizer moments, masks) plus JSON fields."""
    tensors = {f"model/{key}": value for key, value in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"optimizer/{index}/{slot}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    masks = {name: m.mask for name, m in modules.items() if m.mask is not None}
    tensors.update({f"mask/{name}": mask for name, mask in masks.items()})
    version, internal, gauss = rng.getstate()
    fields = {
        "format": CHECKPOINT_FORMAT, "recipe": dataclasses.asdict(recipe), "steps": steps, "step": log_rows[-1]["step"],
        "log": log_rows, "rng": [version, list(internal), gauss], "param_groups": state["param_groups"],
    }  # fmt: skip
    save_tensors(path, tensors, fields)


def _load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     modules: dict[str, FakeQuantLinear], rng: random.Random, recipe: TrainRecipe,
                     steps: int) -> tuple[int, list[dict]]:  # fmt: skip
    """Restore a run from `path` in place; returns the step to resume at and the loss log so far.

    Every field is checked before it is used: a checkpoint of another run is refused, a damaged one
    is reported as corrupt (one line), and nothing in it can run code.
    """
    tensors, fields = load_tensors(path)
    if fields.get("format") != CHECKPOINT_FORMAT:
        raise CorruptFileError(f"{path} is not a compresslm training checkpoint (format {fields.get('format')!r})")
    if fields.get("recipe") != dataclasses.asdict(recipe) or fields.get("steps") != steps:
        raise CompressLMError(f"{path} belongs to another run (recipe or steps differ); use another output")
    try:
        step, log_rows = fields["step"], fields["log"]
        if not (isinstance(step, int) and 0 < step < steps and isinstance(log_rows, list) and len(log_rows) == step
                and all(isinstance(row, dict) for row in log_rows)):  # fmt: skip
            raise ValueError("step and loss log disagree")
        version, internal, gauss = fields["rng"]
        if not (isinstance(internal, list) and all(isinstance(v, int) for v in internal)):
            raise ValueError("random state is not a list of integers")
        rng.setstate((version, tuple(internal), gauss))
        masks = {key.removeprefix("mask/"): t for key, t in tensors.items() if key.startswith("mask/")}
        if not set(masks) <= set(modules):
            raise ValueError(f"masks of unknown layers {sorted(set(masks) - set(modules))[:3]}")
        for name, mask in masks.items():  # masks first: they are buffers of the saved state
            weight = modules[name].weight
            if mask.dtype != weight.dtype or mask.shape != weight.shape or not ((mask == 0) | (mask == 1)).all():
                raise ValueError(f"the mask of {name} is not a 0/1 tensor of its weight's shape and dtype")
            modules[name].mask = mask
        model.load_state_dict({k.removeprefix("model/"): t for k, t in tensors.items() if k.startswith("model/")})
        slots: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, slot = key.split("/", 2)
                slots.setdefault(int(index), {})[slot] = value
        groups = fields["param_groups"]
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": slots, "param_groups": groups})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        reason = reason_of(exc)
        raise CorruptFileError(f"{path} is a corrupt training checkpoint: {reason}") from None
    return step, log_rows


def _hidden_loss(student: tuple, teacher: tuple) -> torch.Tensor:
    """Mean over blocks of ‖h_s − h_t‖² / ‖h_t‖² (each block's output hidden states, embeddings excluded)."""
    terms = [(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-8)
             for s, t in zip(student[1:], teacher[1:], strict=True)]  # fmt: skip
    return torch.stack(terms).mean()


def _export_qat_container(
    lm: LoadedModel, modules: dict[str, FakeQuantLinear], recipe: TrainRecipe, path: Path
) -> Path:
    """The QAT model as a .clm at `path` with the learned steps, every layer at its active width (its
    own width when widths were learned): the weights exactly as trained through the grid."""
    from compresslm.models.assemble import save_compressed
    from compresslm.quant.grid import Grid, quantize_weight, to_compressed
    from compresslm.runtime.linear import CompressedLinear

    snapshot = copy.deepcopy(lm)
    records = {}
    for name, module in modules.items():
        step, zero = module.step_and_zero()
        grid = Grid(module.bits, "group", module.group_size)
        scales = step.detach().half().float()  # the steps as the container stores them
        codes = quantize_weight(module.dense_weight().detach(), grid, scales, zero)
        record = to_compressed(codes, scales, zero, grid, {"algorithm": "qat", "train_recipe": recipe.name})
        records[name] = record
        linear = CompressedLinear(record, module.bias)
        if module.act_bits:  # the learned clip becomes the static per-tensor activation step
            linear.set_activation_quantization(module.act_bits, "tensor", module.activation_step().detach())
        replace_module(snapshot.model, name, linear)
    with torch.no_grad():
        for tensor in snapshot.model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    save_compressed(snapshot, records, path, {"recipe": None, "train_recipe": dataclasses.asdict(recipe)})
    return path


def _write_log(rows: list[dict], out: Path) -> None:
    with (out / "loss.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_loss_log(rows, out / "loss.png")


def plot_loss_log(rows: list[dict], path: Path) -> None:
    """The loss log as a PNG. The total loss can be dominated by a penalty (the 2:4 decay, the rate
    term), so where the run distils, a second panel shows the KL to the teacher on its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    total = [float(r["loss"]) for r in rows]
    kl = [float(r["kl"]) for r in rows]
    penalised = any(k == k and abs(k - t) > 1e-6 * max(1.0, abs(t)) for k, t in zip(kl, total, strict=True))
    panels = 2 if penalised else 1
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.5 + 1.5 * panels), dpi=100, sharex=True, squeeze=False)
    axes[0][0].plot(steps, total)
    axes[0][0].set_ylabel("total loss")
    if panels == 2:
        axes[1][0].plot(steps, kl, color="tab:orange")
        axes[1][0].set_ylabel("KL to teacher")
    for (ax,) in axes:
        ax.grid(True, alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
