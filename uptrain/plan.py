"""The peak-memory plan of an uptraining run, per device, before anything loads.

The student is built on the meta device from its config (the converter's output config for a recipe with a
``convert`` step), given the run's adapters and trainable subset exactly as the run does, and its parameters
counted by role:

- frozen weights, in the dtype the run keeps them (the checkpoint's under bf16/fp16 autocast, float32 when the
  whole model trains or the run computes in float32, about 4.1 or 8 bits per weight of a quantized linear layer);
- trainable parameters, their gradients and AdamW's two moments: 16 bytes each (all float32);
- activations of one micro-batch, with and without gradient checkpointing (``ACTIVATION_FACTORS``);
- the teacher in the compute dtype;
- the loss: one chunk's (tokens, vocabulary) float32 buffers, the hidden-state gradient, and the lm_head's
  gradient when it trains (or the whole logits where the run cannot chunk);
- the runtime itself (torch, the tokenizer, the data; a CUDA context).

Under FSDP the student's parameters, gradients and optimizer states are divided among the processes; on a CPU
every process of the machine shares its memory, so the plan multiplies by the process count there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from convert.families import resolve
from convert.plan import output_config, read_dims
from convert.source import read_config
from kvshrink_base.device import pick_device
from uptrain.adapters import add_adapters, set_trainable
from uptrain.errors import RecipeError
from uptrain.loss import chunkable

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from uptrain.adapters import Student
    from uptrain.recipe import Recipe, Train

GB = 1e9
ADAM_BYTES = 16  # float32 weight, gradient, and AdamW's two moments
QUANTIZED_BYTES = {
    "4bit": 0.5 + 1 / 64,
    "8bit": 1.0,
}  # NF4 plus its double-quantized block scales; int8 plus row scales
# What one decoder layer keeps for backward, per token: bytes per hidden unit (the norms and the residual stream
# stay float32 under autocast, so this hardly depends on the compute dtype) and compute-dtype elements per MLP
# unit. Measured with autograd's saved-tensor hooks on Llama layers (hidden 512 and 1024, MLP 1376 and 2752,
# LoRA on q/k/v/o; bf16 autocast: 21.8 B and 3.0 elements, float32: 22.3 B and 3.0), parameters left out;
# tests/test_lora.py checks it against the hooks on another shape.
ACTIVATION_FACTORS = (22, 3)
RUNTIME_BYTES = {"cpu": 0.6 * GB, "cuda": 0.8 * GB}


@dataclass
class MemoryPlan:
    """One process's peak memory, term by term, in bytes; ``processes`` of them share a CPU's memory."""

    device: str
    capacity: int | None
    frozen: int
    trainable_parameters: int
    trainable: int
    activations: int
    activations_other: int  # the same micro-batch with gradient checkpointing switched the other way
    checkpointing: bool
    teacher: int
    loss: int
    runtime: int
    processes: int = 1

    @property
    def total(self) -> int:
        """The peak bytes: every term, times the processes sharing a CPU's memory."""
        one = self.frozen + self.trainable + self.activations + self.teacher + self.loss + self.runtime
        return one * (self.processes if self.device == "cpu" else 1)

    @property
    def exceeds(self) -> bool:
        """Whether the peak is above the device's known memory."""
        return self.capacity is not None and self.total > self.capacity

    def table(self) -> str:
        """The dry run's plan: one row per term, in GB, and the device's memory."""
        other = "without" if self.checkpointing else "with"
        rows = [
            ("frozen weights", self.frozen),
            (f"trainable ({self.trainable_parameters:,} parameters, gradients, AdamW)", self.trainable),
            (
                f"activations per micro-batch ({'with' if self.checkpointing else 'without'} checkpointing)",
                self.activations,
            ),
            (f"  ({other} checkpointing it would be {self.activations_other / GB:.2f} GB)", None),
            ("teacher", self.teacher),
            ("logits and loss chunk", self.loss),
            ("runtime", self.runtime),
        ]
        lines = [f"  {name:<68} {'' if v is None else f'{v / GB:8.2f} GB'}" for name, v in rows]
        scope = f" x {self.processes} processes on this machine" if self.device == "cpu" and self.processes > 1 else ""
        lines.append(f"  {'peak' + scope:<68} {self.total / GB:8.2f} GB")
        lines.append(
            f"  {'device memory (' + self.device + ')':<68} "
            + ("unknown" if self.capacity is None else f"{self.capacity / GB:8.2f} GB")
        )
        return "\n".join(lines)

    def line(self) -> str:
        """The plan in one line, as a real run prints it."""
        parts = [
            f"frozen {self.frozen / GB:.2f}",
            f"trainable {self.trainable / GB:.2f}",
            f"activations {self.activations / GB:.2f}",
            f"teacher {self.teacher / GB:.2f}",
            f"loss {self.loss / GB:.2f}",
            f"runtime {self.runtime / GB:.2f}",
        ]
        room = "" if self.capacity is None else f" of {self.capacity / GB:.1f} GB"
        return f"memory plan ({self.device}): {self.total / GB:.2f} GB{room} = " + " + ".join(parts) + " GB"

    def warning(self) -> str | None:
        """The line a run prints when the plan exceeds the device, else None."""
        if self.capacity is None or not self.exceeds:
            return None
        return (
            f"warning: the memory plan ({self.total / GB:.1f} GB) exceeds this {self.device}'s "
            f"{self.capacity / GB:.1f} GB; see python -m uptrain RECIPE --dry-run for its terms"
        )


def precision(train: Train, dtype: torch.dtype, device_type: str) -> str:
    """accelerate's mixed precision for ``train.precision``. auto: bf16 on a GPU that has it; on a CPU, bf16 where
    frozen weights stay in a 16-bit checkpoint dtype (a trainable subset or adapters: they cannot take float32
    inputs), else float32."""
    if train.precision != "auto":
        return {"fp32": "no"}.get(train.precision, train.precision)
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    partial = train.trainable != "all"
    return "bf16" if partial and dtype in (torch.bfloat16, torch.float16) else "no"


def config_dtype(config: PretrainedConfig) -> torch.dtype:
    """The floating dtype a transformers config declares (float32 where it declares none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def device_memory(device: str) -> int | None:
    """Total memory of the GPU, or of this machine (its cgroup limit where lower) for the CPU."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model of a transformers config on the meta device: shapes and names, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def student_config(recipe: Recipe) -> PretrainedConfig:
    """The student's config without its weights: recipe.model's, or the converter's output config for
    recipe.convert's source (``convert.plan.output_config``)."""
    from transformers import AutoConfig

    if recipe.model:
        return AutoConfig.from_pretrained(recipe.model)
    c = recipe.convert
    assert c is not None, "a loaded recipe has a model or a convert step"
    local = Path(c.source).expanduser()
    source = read_config(local) if local.is_dir() else AutoConfig.from_pretrained(c.source).to_dict()
    try:
        _, spec = resolve(source)
    except KeyError as exc:
        raise RecipeError(f"convert: {exc.args[0]} is not a family the converter knows") from None
    config = output_config(source, spec, read_dims(source, spec), c.kv_heads, c.dtype)
    return AutoConfig.for_model(**config)


@dataclass
class RunShape:
    """What the plan needs of a run besides its recipe: where it runs and how."""

    device: str  # cpu | cuda
    precision: str  # accelerate's mixed precision: no | bf16 | fp16
    dtype: torch.dtype  # the student checkpoint's dtype
    processes: int = 1
    fsdp: bool = False


def frozen_in_float32(train: Train, mixed_precision: str) -> bool:
    """Whether a run keeps its (unquantized) frozen weights in float32 rather than the checkpoint's dtype: when
    everything trains (the master weights) or it computes in float32."""
    return train.trainable == "all" or mixed_precision == "no"


def _frozen_bytes(model: Student, recipe: Recipe, shape: RunShape) -> int:
    """The frozen parameters as the run keeps them (``uptrain.student.load_student``)."""
    quantized = recipe.train.base_quantization
    kept = 4 if frozen_in_float32(recipe.train, shape.precision) else shape.dtype.itemsize
    head = model.get_output_embeddings()
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head}
    total = 0.0
    for p in model.parameters():
        if not p.requires_grad:
            per = QUANTIZED_BYTES[quantized] if quantized != "none" and id(p) in linear else kept
            total += p.numel() * per
    return int(total)


def _activations(config: PretrainedConfig, recipe: Recipe, element: int, residual: int, checkpointing: bool) -> int:
    """Bytes kept for backward over one micro-batch (``ACTIVATION_FACTORS``); with checkpointing each layer keeps
    its input (``residual`` bytes an element) and one layer at a time its whole set."""
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len
    hidden = config.hidden_size
    width = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    per_layer = tokens * (ACTIVATION_FACTORS[0] * hidden + ACTIVATION_FACTORS[1] * width * element)
    layers = config.num_hidden_layers
    if checkpointing:
        return layers * tokens * hidden * residual + per_layer
    return layers * per_layer


def _loss_bytes(model: Student, recipe: Recipe, shape: RunShape) -> int:
    """The loss's (tokens, vocabulary) buffers: one chunk's, or the whole logits where the run cannot chunk."""
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len
    distilled = recipe.distill.weight > 0
    chunk = 0 if shape.fsdp or not chunkable(model) else recipe.train.loss_chunk_tokens
    if chunk == 0:
        return tokens * vocab * 4 * (4 if distilled else 2)
    head = model.get_output_embeddings().weight
    head_grad = head.numel() * 4 if head.requires_grad else 0
    return min(chunk, tokens) * vocab * 4 * (5 if distilled else 3) + tokens * hidden * 4 + head_grad


def memory_plan(
    recipe: Recipe, config: PretrainedConfig, shape: RunShape, teacher_config: PretrainedConfig | None = None
) -> MemoryPlan:
    """The run's plan from its recipe and configs (``student_config``; the teacher's, when it distills)."""
    base = meta_model(config)
    model: Student = base if recipe.lora is None else add_adapters(base, recipe.lora)
    trainable = set_trainable(model, recipe.train.trainable, adapters=recipe.lora is not None)
    element = 2 if shape.precision in ("bf16", "fp16") else 4
    kept = 4 if frozen_in_float32(recipe.train, shape.precision) else shape.dtype.itemsize
    frozen, states = _frozen_bytes(model, recipe, shape), trainable * ADAM_BYTES
    if shape.fsdp:
        frozen, states = frozen // shape.processes, states // shape.processes
    checkpointing = recipe.train.gradient_checkpointing
    activations = [_activations(config, recipe, element, kept, c) for c in (checkpointing, not checkpointing)]
    teacher = 0
    if teacher_config is not None and recipe.distill.mode == "online":  # offline: never in memory
        teacher = sum(p.numel() for p in meta_model(teacher_config).parameters()) * element
    return MemoryPlan(
        device=shape.device,
        capacity=device_memory(shape.device),
        frozen=frozen,
        trainable_parameters=trainable,
        trainable=states,
        activations=activations[0],
        activations_other=activations[1],
        checkpointing=checkpointing,
        teacher=teacher,
        loss=_loss_bytes(model, recipe, shape),
        runtime=int(RUNTIME_BYTES[shape.device]),
        processes=shape.processes,
    )


def dry_run(recipe: Recipe) -> MemoryPlan:
    """The plan of ``recipe`` launched here (``accelerate launch`` sets WORLD_SIZE and, for FSDP,
    ACCELERATE_USE_FSDP), from configs alone."""
    from transformers import AutoConfig

    device = "cuda" if pick_device("auto").type == "cuda" else "cpu"  # where accelerate will put the run
    config = student_config(recipe)
    dtype = config_dtype(config)
    shape = RunShape(
        device,
        precision(recipe.train, dtype, device),
        dtype,
        int(os.environ.get("WORLD_SIZE", "1")),
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true",
    )
    teacher = AutoConfig.from_pretrained(recipe.teacher) if recipe.teacher else None
    return memory_plan(recipe, config, shape, teacher)
