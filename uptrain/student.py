"""The models of an uptraining run: the student (``model``, or ``convert``'s source converted first; quantized
where the recipe says, with LoRA adapters from ``uptrain.adapters``), the frozen teacher, AdamW's parameter groups
and torch.compile."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from convert import ConversionError, convert_checkpoint
from convert.merge import METHODS
from convert.options import ConvertOptions
from kvshrink_base.errors import first_line
from kvshrink_base.models import load_model
from kvshrink_base.sample import Sampling, cached_samples
from kvshrink_base.text import local_files
from uptrain.adapters import add_adapters, set_trainable, subset_family, target_modules
from uptrain.errors import RecipeError
from uptrain.plan import config_dtype, frozen_in_float32
from uptrain.recipe import Recipe

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState
    from transformers import BitsAndBytesConfig, PreTrainedModel

    from uptrain.adapters import Student


def model_path(recipe: Recipe, state: PartialState) -> str:
    """The student: recipe.model, or recipe.convert's source converted once into OUTPUT_DIR/converted.

    The main process converts; the others wait for the finished checkpoint on disk rather than in a collective,
    which would time out (``train.collective_timeout_s``) on a conversion that takes longer. A failed conversion
    ends the main process, and the launcher ends the rest.
    """
    if recipe.model:
        return recipe.model
    assert recipe.convert is not None, "a loaded recipe has a model or a convert step"
    target = Path(recipe.output_dir) / "converted"
    done = target / "conversion.json"
    if state.is_main_process and not done.exists():
        try:
            convert_checkpoint(recipe.convert.source, target, convert_options(recipe), overwrite=True)
        except ConversionError as exc:
            raise RecipeError(f"convert: {exc}") from None
    while not done.exists():
        time.sleep(1.0)
    return str(target)


def convert_options(recipe: Recipe) -> ConvertOptions:
    """The recipe's convert step as converter options. Calibrated methods without convert.calibration_data
    calibrate on data.train's local files, or, when it names none (a hub stream), on ``convert.calibration_tokens``
    sampled from the source (kvshrink_base.sample, into OUTPUT_DIR/calibration-samples)."""
    c = recipe.convert
    assert c is not None, "a recipe without a convert step has no convert options"
    options = ConvertOptions(**{name: getattr(c, name) for name in ConvertOptions.fields()})
    if METHODS[c.method].calibrated and not c.calibration_data:
        files = [f for entry in recipe.data.train for f in (local_files(entry) or [])]
        if not files:
            directory = Path(recipe.output_dir) / "calibration-samples"
            files = [str(cached_samples(c.source, directory, Sampling(tokens=c.calibration_tokens)))]
        options.calibration_data = files
    return options


def param_groups(model: Student, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two AdamW groups: matrices decay; norms, biases and embeddings do not."""
    embeddings = {id(model.get_input_embeddings().weight)}  # also the tied output projection, if tied
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_teacher(path: str) -> PreTrainedModel:
    """The teacher checkpoint at ``path`` (recipe.teacher), whole on every process. Not sharded: FSDP's
    RAM-efficient loading (recipes/accelerate/fsdp.yaml) would leave its weights on the meta device outside
    process 0."""
    from accelerate.utils import patch_environment

    with patch_environment(fsdp_cpu_ram_efficient_loading="false"):
        return load_model(path, what="teacher")


def check_model_settings(recipe: Recipe, path: str) -> None:
    """The recipe against the student's config, before any weight loads: blocks within its positions, a teacher
    with its vocabulary, the roles of its family (a lora target it lacks, an unknown family for a subset)."""
    from transformers import AutoConfig

    t, student = recipe.train, AutoConfig.from_pretrained(path)
    limit = getattr(student, "max_position_embeddings", None)
    if limit is not None and recipe.data.seq_len > limit:
        raise RecipeError(f"data.seq_len {recipe.data.seq_len} is beyond the model's {limit} positions")
    if recipe.teacher:  # the teacher's vocabulary, in both distillation modes
        vocab = AutoConfig.from_pretrained(recipe.teacher).vocab_size
        if vocab != student.vocab_size:
            raise RecipeError(
                f"the teacher's vocabulary ({vocab}) differs from the student's "
                f"({student.vocab_size}); distillation needs the same tokenizer"
            )
    if t.trainable == "all" and recipe.lora is None:
        return
    config = student.to_dict()
    if recipe.lora is not None:
        target_modules(config, recipe.lora.targets)
    if t.trainable not in ("all", "none"):
        subset_family(config, t.trainable)


def check_quantization(kind: str, state: PartialState) -> None:
    """A quantized base needs bitsandbytes, a CUDA or CPU device, and no FSDP (which would shard the quantized
    weights): one line before any work otherwise."""
    if kind == "none":
        return
    try:
        import bitsandbytes  # noqa: F401  (its import checks its own backends)
    except ImportError:
        raise RecipeError(
            f"train.base_quantization: {kind} needs bitsandbytes: pip install 'kvshrink[quant]'"
        ) from None
    if state.device.type not in ("cuda", "cpu"):
        raise RecipeError(f"train.base_quantization: {kind} runs on CUDA or the CPU, not {state.device.type}")
    if state.distributed_type.value == "FSDP":
        raise RecipeError(
            f"train.base_quantization: {kind} does not run under FSDP here; launch with "
            "recipes/accelerate/ddp.yaml or one process"
        )


def checkpoint_dtype(path: str) -> torch.dtype:
    """The floating dtype a checkpoint's config.json declares (float32 where it declares none)."""
    from transformers import AutoConfig

    try:
        return config_dtype(AutoConfig.from_pretrained(path))
    except (OSError, ValueError) as exc:
        raise RecipeError(f"cannot read the config of {path}: {first_line(exc)}") from None


def compute_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype the run computes in: its mixed precision's (bf16, fp16), else float32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


def quantization(kind: str, compute: torch.dtype) -> BitsAndBytesConfig:
    """transformers' bitsandbytes config for ``train.base_quantization`` (4bit: NF4 with double quantization)."""
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def keep_4bit_trainable(model: PreTrainedModel) -> PreTrainedModel:
    """bitsandbytes' 4-bit layers on the CPU repack their weights for an inference kernel the first time they run
    in eval mode without gradients (every in-loop eval), and that kernel has no backward: training after it
    would stop the gradient at every quantized layer (torch only warns). Switched off, they keep the
    dequantizing matmul, which backpropagates."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # torch types Module.__setattr__ for tensors and modules; bitsandbytes' flag is a bool
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
    return model


def load_student(recipe: Recipe, accelerator: Accelerator, path: str) -> PreTrainedModel:
    """The student: float32 when trained whole or when the run computes in float32; otherwise in its checkpoint's
    dtype, or quantized by bitsandbytes onto this process's device (``train.base_quantization``)."""
    kind = recipe.train.base_quantization
    if kind != "none":
        model = load_model(
            path,
            quantization_config=quantization(kind, compute_dtype(accelerator)),
            device_map={"": accelerator.device},
        )
        return keep_4bit_trainable(model)
    model = load_model(path)
    if frozen_in_float32(recipe.train, accelerator.mixed_precision):
        model = model.float()  # master weights in fp32; autocast gives bf16/fp16 compute
    return model


def load_models(
    recipe: Recipe, accelerator: Accelerator, path: str
) -> tuple[Student, PreTrainedModel | None, torch.dtype, int]:
    """(student with its trainable subset and adapters, frozen teacher in the compute dtype or None, the student's
    checkpoint dtype, the trainable parameter count). Trained parameters are float32; frozen ones stay in the
    checkpoint's dtype where the run computes in bf16/fp16 (``load_student``)."""
    base = load_student(recipe, accelerator, path)
    teacher = load_teacher(recipe.teacher) if recipe.teacher and recipe.distill.mode == "online" else None
    if recipe.train.gradient_checkpointing:
        if hasattr(base, "activation_checkpointing_enable"):  # transformers 5's name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    model: Student = base if recipe.lora is None else add_adapters(base, recipe.lora)
    trainable = set_trainable(model, recipe.train.trainable, adapters=recipe.lora is not None)
    if teacher is not None:  # the student's compute dtype, on its device, frozen
        teacher.to(accelerator.device, compute_dtype(accelerator)).eval().requires_grad_(False)
    return model, teacher, checkpoint_dtype(path), trainable


def compile_student(accelerator: Accelerator, model: torch.nn.Module, backend: str) -> None:
    """torch.compile the prepared student in place (``nn.Module.compile``), after accelerate's wrappers.

    Not accelerate's dynamo plugin, which wraps the model in an OptimizedModule: save_state then writes
    ``_orig_mod.``-prefixed keys, and ``unwrap_model`` keeps the wrapper by default (so would the final
    checkpoint). Compiling the inner module in place leaves the module tree, its state-dict keys, DDP's wrapper,
    save_state/load_state and unwrap_model as they were; only its forward call runs compiled.
    """
    accelerator.unwrap_model(model).compile(backend=backend)
