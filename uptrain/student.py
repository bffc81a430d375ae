"""The models of an uptraining run: the student (``model``, or ``convert``'s source converted first), the
frozen teacher, the trainable subset, AdamW's parameter groups and torch.compile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from convert import ConversionError, convert_checkpoint
from convert.families import resolve
from convert.merge import METHODS
from convert.options import ConvertOptions
from kvshrink.models import load_model
from kvshrink.text import local_files
from uptrain.errors import RecipeError
from uptrain.recipe import Recipe
from uptrain.sample import Sampling, cached_samples


def model_path(recipe: Recipe, accelerator) -> str:
    """The student: recipe.model, or recipe.convert's source converted once into OUTPUT_DIR/converted."""
    if recipe.model:
        return recipe.model
    target = Path(recipe.output_dir) / "converted"
    if accelerator.is_main_process and not (target / "conversion.json").exists():
        try:
            convert_checkpoint(recipe.convert.source, target, convert_options(recipe), overwrite=True)
        except ConversionError as exc:
            raise RecipeError(f"convert: {exc}") from None
    accelerator.wait_for_everyone()
    return str(target)


def convert_options(recipe: Recipe) -> ConvertOptions:
    """The recipe's convert step as converter options. Calibrated methods without convert.calibration_data
    calibrate on data.train's local files, or, when it names none (a hub stream), on
    ``convert.calibration_tokens`` sampled from the source (uptrain.sample, into OUTPUT_DIR/calibration-samples)."""
    c = recipe.convert
    options = ConvertOptions(**{name: getattr(c, name) for name in ConvertOptions.fields()})
    if METHODS[c.method].calibrated and not c.calibration_data:
        files = [f for entry in recipe.data.train for f in (local_files(entry) or [])]
        if not files:
            directory = Path(recipe.output_dir) / "calibration-samples"
            files = [str(cached_samples(c.source, directory, Sampling(tokens=c.calibration_tokens)))]
        options.calibration_data = files
    return options


def set_trainable(model, mode: str) -> int:
    """Freeze all but the modules of ``mode`` (convert.roles.SUBSETS); returns the trainable parameter count."""
    if mode != "all":
        try:
            _, spec = resolve(model.config.to_dict())
        except KeyError as exc:
            raise RecipeError(f"train.trainable: {mode} needs a family the converter knows; {exc.args[0]} is not "
                              f"one (use train.trainable: all)") from None
        if mode == "kv" and "qkv" in spec.tensors:
            raise RecipeError("train.trainable: kv needs separate k/v projections; this family fuses them "
                              "(use attention)")
        pattern = spec.parameter_pattern(mode)
        for name, p in model.named_parameters():
            p.requires_grad_(pattern.fullmatch(name) is not None)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two AdamW groups: matrices decay; norms, biases and embeddings do not."""
    embeddings = {id(model.get_input_embeddings().weight)}  # also the tied output projection, if tied
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_inputs(recipe: Recipe, model, teacher) -> None:
    """Blocks within the student's positions; a teacher with the student's vocabulary."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and recipe.data.seq_len > limit:
        raise RecipeError(f"data.seq_len {recipe.data.seq_len} is beyond the model's {limit} positions")
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise RecipeError(f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the student's "
                          f"({model.config.vocab_size}); distillation needs the same tokenizer")


def load_teacher(recipe: Recipe):
    """The teacher, whole on every process. Not sharded: FSDP's RAM-efficient loading
    (recipes/accelerate/fsdp.yaml) would leave its weights on the meta device outside process 0."""
    from accelerate.utils import patch_environment

    with patch_environment(fsdp_cpu_ram_efficient_loading="false"):
        return load_model(recipe.teacher, what="teacher")


def load_models(recipe: Recipe, accelerator, path: str):
    """(student in fp32 with its trainable subset, frozen teacher in the compute dtype or None, the student's
    source dtype, the trainable parameter count)."""
    model = load_model(path)
    source_dtype = next(model.parameters()).dtype
    model = model.float()  # master weights in fp32; autocast gives bf16/fp16 compute
    teacher = load_teacher(recipe) if recipe.teacher else None
    check_inputs(recipe, model, teacher)
    trainable = set_trainable(model, recipe.train.trainable)
    if recipe.train.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if teacher is not None:  # the student's compute dtype, on its device, frozen
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
        teacher.to(accelerator.device, compute).eval().requires_grad_(False)
    return model, teacher, source_dtype, trainable


def compile_student(accelerator, model, backend: str) -> None:
    """torch.compile the prepared student in place (``nn.Module.compile``), after accelerate's wrappers.

    Not accelerate's dynamo plugin, which wraps the model in an OptimizedModule: save_state then writes
    ``_orig_mod.``-prefixed keys, and ``unwrap_model`` keeps the wrapper by default (so would the final
    checkpoint). Compiling the inner module in place leaves the module tree, its state-dict keys, DDP's wrapper,
    save_state/load_state and unwrap_model as they were; only its forward call runs compiled.
    """
    accelerator.unwrap_model(model).compile(backend=backend)
