"""LoRA adapters on the student through peft, on the modules of the recipe's roles.

A recipe names roles (``lora.targets``: q, k, v, o, qkv); the family table (``convert.families``) names each
role's module, as it does for ``train.trainable``. A family that fuses Q, K and V in one module (phi3, falcon,
gpt_bigcode, gpt2) takes one adapter on it for any of q, k, v and qkv. The adapted modules' base weights and
everything outside ``train.trainable``'s subset stay frozen in the checkpoint's dtype; the adapters (peft makes
them float32) and the subset's parameters train in float32.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from convert.families import Family, resolve
from uptrain.errors import RecipeError
from uptrain.recipe import Lora

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

    # The student as a run holds it before accelerate wraps it: the model itself, or a PeftModel with adapters.
    Student: TypeAlias = PreTrainedModel | PeftModel

# bitsandbytes (imported by peft and by transformers' quantizer) looks for an optional CPU kernel on the hub at
# import and warns on two loggers when it cannot have it; its own CPU code runs instead.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)

PEFT_PREFIX = "base_model.model."  # what peft puts before the wrapped model's own parameter names
ADAPTER_NAME = "default"


def family(config: Mapping[str, Any], what: str) -> Family:
    """The family table of a config.json, or one line naming ``what`` needed it."""
    try:
        return resolve(config)[1]
    except KeyError as exc:
        raise RecipeError(f"{what} needs a family the converter knows; {exc.args[0]} is not one") from None


def subset_family(config: Mapping[str, Any], subset: str) -> Family:
    """The family table a ``train.trainable`` subset selects from; kv needs separate K and V modules."""
    spec = family(config, f"train.trainable: {subset}")
    if subset == "kv" and "qkv" in spec.tensors:
        raise RecipeError(
            "train.trainable: kv needs separate k/v projections; this family fuses them "
            "(use attention, or none with lora)"
        )
    return spec


def target_modules(config: Mapping[str, Any], targets: list[str]) -> list[str]:
    """The module names (under the family's attention path) that ``targets``' roles adapt, each once.

    Raises:
        RecipeError: a family the converter does not know, or a role it lacks.
    """
    spec = family(config, "lora")
    modules: list[str] = []
    for role in targets:
        name = spec.tensors.get(role)
        if name is None and role in ("q", "k", "v"):
            name = spec.tensors.get("qkv")  # fused: one adapter on the qkv module
        if name is None:
            arch = (config.get("architectures") or [config.get("model_type")])[0]
            roles = sorted({"q", "k", "v", "qkv"} & set(spec.tensors) or {"q", "k", "v"}) + ["o"]
            raise RecipeError(f"lora.targets: {arch} has no {role} module; its roles are {', '.join(roles)}")
        if name not in modules:
            modules.append(name)
    return modules


def lora_config(model: PreTrainedModel, lora: Lora) -> LoraConfig:
    """peft's LoraConfig for the student: the targeted modules as one exact pattern over their full paths."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    spec = family(model.config.to_dict(), "lora")
    pattern = spec.module_pattern(target_modules(model.config.to_dict(), lora.targets))
    conv1d = any(isinstance(m, Conv1D) for n, m in model.named_modules() if pattern.fullmatch(n))
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; its scale alpha / r takes a float
        lora_dropout=lora.dropout,
        target_modules=pattern.pattern,
        bias="none",
        fan_in_fan_out=conv1d,
    )  # Conv1D stores (in, out): peft's flag for it


def add_adapters(model: PreTrainedModel, lora: Lora) -> PeftModel:
    """The student wrapped in a PeftModel with float32 adapters; the base frozen as it is."""
    from peft import get_peft_model

    config = lora_config(model, lora)
    with warnings.catch_warnings():  # peft asks transformers 5 for is_gradient_checkpointing, deprecated there
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config, adapter_name=ADAPTER_NAME, autocast_adapter_dtype=True)


def base_name(name: str) -> str:
    """A PeftModel parameter's name as the wrapped model names it (``base_layer`` dropped)."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def set_trainable(model: Student, subset: str, adapters: bool) -> int:
    """Train ``subset``'s modules fully (none, all, attention or kv; ``convert.roles.SUBSETS``) and the LoRA
    adapters where ``adapters``; freeze the rest. Trained parameters become float32, frozen ones keep their dtype.
    Returns the trainable parameter count."""
    if subset == "all":
        model.requires_grad_(True)
    else:
        config = model.config.to_dict()
        spec = subset_family(config, subset)
        full = spec.parameter_pattern(subset) if subset != "none" else re.compile(r"(?!)")
        for name, p in model.named_parameters():
            p.requires_grad_(bool(full.fullmatch(base_name(name))) or (adapters and is_adapter(name)))
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_adapter(name: str) -> bool:
    """Whether a PeftModel parameter is one of the LoRA adapters' A or B matrices."""
    return ".lora_A." in name or ".lora_B." in name
