"""LoRA adapters merged into a plain checkpoint, one tensor at a time.

``python -m uptrain.merge ADAPTER BASE OUTPUT``: ADAPTER is a run's ``final-adapter`` (peft's
``adapter_model.safetensors`` and ``adapter_config.json``, plus ``trained.safetensors`` with the parameters the
run trained fully, if any); BASE the checkpoint it was trained on, in its own dtype (never the 4-bit copy a
QLoRA run trained against). Each of BASE's tensors is copied byte for byte, replaced by its trained value, or
read and given its adapter's product ``B @ A * alpha / r`` in float32, then cast back to its dtype. The output
goes through the converter's streaming writer into an atomic directory, so the merge holds about one tensor,
not the model. The run's ``OUTPUT_DIR/final`` is written this way.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from convert.errors import ConversionError
from convert.source import WeightSource, check_checkpoint, open_weights, torch_dtype, write_tensor_bytes
from convert.writer import OutTensor, shard_names, shard_plan, write_index, write_shard
from kvshrink_base.atomic import AtomicDirectory
from kvshrink_base.errors import KvshrinkError, OneLineParser, check_output_dir, first_line, run_cli
from uptrain.adapters import base_name, is_adapter

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from peft import PeftModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINED = "trained.safetensors"  # the fully trained parameters, in the base model's names
SHARD_BYTES = 5 * 10**9
_WEIGHT_FILE = ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class MergeError(KvshrinkError):
    """An adapter that cannot be merged into its base: one line, exit code 2."""


@dataclass
class Adapter:
    """One adapted module: its A (r, in) and B (out, r) in float32, and the scale of their product."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool  # Conv1D weights are stored (in, out)

    def delta(self) -> torch.Tensor:
        """``B @ A * scale`` in float32, in the weight's own layout ((in, out) for Conv1D)."""
        product = self.b.float() @ self.a.float() * self.scale
        return product.T if self.transposed else product


def read_adapters(directory: Path) -> tuple[dict[str, Adapter], dict[str, torch.Tensor]]:
    """({base weight name: its adapter}, {base name: fully trained tensor}) of a saved adapter directory."""
    from safetensors.torch import load_file

    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        weights = load_file(directory / ADAPTER_WEIGHTS)
        trained = load_file(directory / TRAINED) if (directory / TRAINED).exists() else {}
    except (OSError, ValueError) as exc:
        raise MergeError(
            f"{directory} is not a saved LoRA adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}): {first_line(exc)}"
        ) from None
    if (
        config.get("peft_type") != "LORA"
        or config.get("use_dora")
        or config.get("rank_pattern")
        or config.get("alpha_pattern")
    ):
        raise MergeError(f"{directory}: only plain LoRA adapters merge here (no DoRA, rank or alpha patterns)")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    adapters: dict[str, Adapter] = {}
    for key, tensor in weights.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = weights.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                raise MergeError(f"{directory}: {key} has no lora_B")
            adapters[f"{module}.weight"] = Adapter(tensor, b, scale, bool(config.get("fan_in_fan_out")))
    return adapters, trained


def merged_tensors(
    base: WeightSource, adapters: dict[str, Adapter], trained: dict[str, torch.Tensor]
) -> list[OutTensor]:
    """Every tensor of ``base`` as the output has it: byte copies, trained values, or base plus adapter."""
    missing = sorted((set(adapters) | set(trained)) - set(base.tensors))
    if missing:
        raise MergeError(
            f"the base checkpoint has no tensor {missing[0]}, which the adapter changes; merge into "
            "the checkpoint the run trained"
        )
    out = []
    for name, info in base.tensors.items():
        if name in trained:
            write = partial(_write_trained, trained[name], info.dtype)
        elif name in adapters:
            write = partial(_write_merged, base, name, adapters[name])
        else:
            out.append(OutTensor(name, info.dtype, info.shape, partial(base.copy_raw, name)))
            continue
        out.append(OutTensor(name, info.dtype, info.shape, write, computed=True))
    return out


def _write_trained(tensor: torch.Tensor, dtype: str, out: BinaryIO) -> None:
    write_tensor_bytes(tensor.to(torch_dtype(dtype)), out)


def _write_merged(base: WeightSource, name: str, adapter: Adapter, out: BinaryIO) -> None:
    weight = base.read(name)
    merged = weight.float() + adapter.delta()
    if merged.shape != weight.shape:
        raise MergeError(f"the adapter of {name} is {tuple(merged.shape)}, the weight {tuple(weight.shape)}")
    write_tensor_bytes(merged.to(weight.dtype), out)


def merge(adapter_dir: Path, base_dir: Path, output: Path) -> Path:
    """Write ``output``: ``base_dir``'s checkpoint with the adapters of ``adapter_dir`` merged, its other files
    (config, tokenizer) copied. Atomic: a failure leaves no ``output``.

    Raises:
        MergeError: not an adapter, or one that changes tensors the base lacks.
        ConversionError: a base checkpoint that is missing, truncated or corrupt.
    """
    adapters, trained = read_adapters(Path(adapter_dir))
    base = open_weights(Path(base_dir))
    tensors = merged_tensors(base, adapters, trained)
    shards = shard_plan(tensors, SHARD_BYTES)
    with AtomicDirectory(Path(output)) as tmp:
        names = shard_names(len(shards))
        for shard, file in zip(shards, names):
            write_shard(tmp / file, shard)
        if len(shards) > 1:
            write_index(tmp, shards, names)
        for path in sorted(Path(base_dir).iterdir()):
            if (
                path.is_file()
                and not path.name.startswith(".")
                and not path.name.endswith(".safetensors")
                and path.name not in _WEIGHT_FILE
            ):
                shutil.copyfile(path, tmp / path.name)
    return Path(output)


def save_adapter(accelerator: Accelerator, model: torch.nn.Module, directory: Path) -> None:
    """A run's adapters in peft's format, and its fully trained parameters (``trained.safetensors``, float32, the
    base model's names), into ``directory`` atomically; gathered from every process, written by the main one."""
    from safetensors.torch import save_file

    state = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers)
    if accelerator.is_main_process:
        peft_model: PeftModel = accelerator.unwrap_model(model)
        full = {
            name: base_name(name)
            for name, p in peft_model.named_parameters()
            if p.requires_grad and not is_adapter(name)
        }
        with AtomicDirectory(directory, temp_name=f".tmp-{directory.name}") as tmp:
            peft_model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)  # peft takes a str
            if full:
                save_file({full[n]: state[n].detach().float().contiguous() for n in full}, str(tmp / TRAINED))
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None, prog: str = "python -m uptrain.merge") -> int:
    """Run the command; returns its exit code (2: bad input, one line, nothing written)."""
    parser = OneLineParser(
        prog=prog,
        description="Merge a run's LoRA adapters (OUTPUT_DIR/final-adapter) into its base "
        "checkpoint, one tensor at a time.",
    )
    parser.add_argument("adapter", help="the adapter directory (a run's final-adapter)")
    parser.add_argument("base", help="the checkpoint the adapters were trained on, in its own dtype")
    parser.add_argument("output", help="the merged checkpoint's directory (must not exist, or be empty)")
    args = parser.parse_args(argv)

    def body() -> int:
        output = Path(args.output)
        check_output_dir(output, "OUTPUT")
        if output.is_dir() and any(output.iterdir()):
            raise MergeError(f"OUTPUT {output} exists and is not empty; choose a new directory")
        try:
            check_checkpoint(args.base, hub=False)
            merge(Path(args.adapter), Path(args.base), output)
        except ConversionError as exc:
            raise MergeError(f"BASE {exc}") from None
        print(f"merged {args.adapter} into {args.base}: {output}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
