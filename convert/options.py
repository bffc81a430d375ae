"""What a conversion produces: one options object for the CLI, the Python API, the recipe's convert step and the demo.

How a run behaves (overwrite, dry run, progress, the command line for the model card) is given to
``convert_checkpoint`` beside it, not stored in it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError
from convert.merge import GROUPINGS, METHODS, calibrated_names
from kvshrink_base.device import DEVICE_CHOICES, valid_name

DEFAULT_TOKENS = 65536  # --calibration-tokens
DEFAULT_SEQ_LEN = 512  # --calibration-seq-len
CALIBRATION_ORDERS = ("parallel", "sequential")
QKVO = frozenset("qkvo")
# ``--recommended``: the conversion docs/convert.md recommends and the demo runs. On a CPU, fewer calibration
# tokens and local steps: the knee of quality against time on SmolLM2-135M (docs/benchmarks.md).
RECOMMENDED = {"method": "aware", "calibration_order": "sequential", "refit_o": True, "local_steps": 100}
RECOMMENDED_CPU_LOCAL_STEPS = 25
RECOMMENDED_CPU_TOKENS = 32768
DTYPES = {"auto": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # --dtype -> safetensors dtype


@dataclass
class ConvertOptions:
    """The choices of a conversion (CLI flags with dashes: ``--kv-heads``, ``--calibration-data``, ...).

    Attributes:
        kv_heads: the KV-head count wanted; it must divide the source's.
        method: a registered merge method (``convert.merge.METHODS``): mean, first, random, svd, aware.
        grouping: a registered grouping (``convert.merge.GROUPINGS``): contiguous or similarity.
        calibration_data: text files (.txt, .md, .jsonl) the source model runs on, for calibrated methods and
            permuting groupings; without it a calibrated method runs on text sampled from the source itself.
        calibration_tokens: how many calibration tokens to run.
        calibration_seq_len: tokens per calibration forward pass.
        calibration_bos: start every calibration sequence with the tokenizer's BOS (where it has one). Off by
            default: on SmolLM2-135M-Instruct it made the recommended conversion worse (docs/benchmarks.md).
        calibration_order: ``parallel`` (one pass of the source model) or ``sequential`` (layer by layer, each
            layer's statistics taken with the layers below already converted; ``convert.calibrate``).
        refit_o: after each layer's merge, refit its output projection by least squares so that the converted
            heads reproduce the original attention output on the calibration text (sequential order only).
        local_steps: after each layer's merge (and O refit), this many Adam steps on its Q, merged K/V and O so
            that its attention reproduces the original's output on the calibration text (sequential order only;
            0: none).
        dtype: ``auto`` (keep the source's) or bfloat16 / float16 / float32.
        max_shard_size: bytes, or a size like ``5GB``.
        seed: the random source of ``method="random"``.
        device: where calibration runs: ``auto`` (CUDA, then MPS, then the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        allow_pickle: accept ``pytorch_model.bin`` (loaded with ``weights_only=True``).
    """

    kv_heads: int
    method: str = "mean"
    grouping: str = "contiguous"
    calibration_data: list[str] | None = None
    calibration_tokens: int = DEFAULT_TOKENS
    calibration_seq_len: int = DEFAULT_SEQ_LEN
    calibration_order: str = "parallel"
    calibration_bos: bool = False
    refit_o: bool = False
    local_steps: int = 0
    dtype: str = "auto"
    max_shard_size: str | int = "5GB"
    seed: int = 0
    allow_pickle: bool = False
    device: str = "auto"

    @classmethod
    def recommended(cls, kv_heads: int, on_cpu: bool, **overrides: Any) -> ConvertOptions:
        """The recommended conversion (``RECOMMENDED``; fewer local steps and calibration tokens on a CPU), with
        ``overrides`` on top."""
        preset = dict(RECOMMENDED)
        if on_cpu:
            preset.update(local_steps=RECOMMENDED_CPU_LOCAL_STEPS, calibration_tokens=RECOMMENDED_CPU_TOKENS)
        return cls(kv_heads=kv_heads, **{**preset, **overrides})

    def validate(self) -> None:
        """Refuse impossible combinations with one line naming the flag (ConversionError)."""
        if self.method not in METHODS:
            raise ConversionError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.grouping not in GROUPINGS:
            raise ConversionError(f"--grouping {self.grouping!r} is not one of {', '.join(GROUPINGS)}")
        if self.calibration_data and not self.uses_calibration:
            raise ConversionError(
                f"--calibration-data is used by --method {'/'.join(calibrated_names())} or "
                f"--grouping similarity, not by --method {self.method} with {self.grouping} groups"
            )
        if self.calibration_tokens < 1 or self.calibration_seq_len < 1:
            raise ConversionError("--calibration-tokens and --calibration-seq-len must be positive")
        if self.calibration_order not in CALIBRATION_ORDERS:
            raise ConversionError(
                f"--calibration-order {self.calibration_order!r} is not one of {', '.join(CALIBRATION_ORDERS)}"
            )
        if self.refit_o and (self.calibration_order != "sequential" or "o" not in METHODS[self.method].changes):
            raise ConversionError(
                "--refit-o needs --calibration-order sequential and a method that rewrites O "
                f"({', '.join(n for n, m in METHODS.items() if 'o' in m.changes)})"
            )
        if self.local_steps < 0:
            raise ConversionError(f"--local-steps must be 0 or more, got {self.local_steps}")
        if self.local_steps and (self.calibration_order != "sequential" or METHODS[self.method].changes != QKVO):
            raise ConversionError(
                "--local-steps needs --calibration-order sequential and a method that rewrites "
                f"Q, K, V and O ({', '.join(n for n, m in METHODS.items() if m.changes == QKVO)})"
            )
        if not valid_name(self.device):
            raise ConversionError(f"--device {self.device!r} is not one of {DEVICE_CHOICES}")
        if self.dtype not in DTYPES:
            raise ConversionError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def uses_calibration(self) -> bool:
        """Calibration text may weigh this conversion (calibrated methods, permuting groupings)."""
        return METHODS[self.method].calibrated or GROUPINGS[self.grouping].permutes

    @property
    def calibrates(self) -> bool:
        """The source runs on calibration text: a calibrated method (on sampled text when none is given), or a
        permuting grouping given text."""
        return METHODS[self.method].calibrated or bool(self.calibration_data and self.uses_calibration)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
