"""The calibration moments' precision: float32 per block summed in float64 (what the walk does) against all float64.

    python bench/moment_precision.py [--tokens 16384] [--seq-len 512]

SmolLM2-135M-Instruct runs on ``--tokens`` tokens of the training plays in blocks of ``--seq-len``; hooks take
the input x of every layer's Q projection and add up C = Σ [x, 1][x, 1]ᵀ both ways. Printed per layer: the
relative error ‖C32 − C64‖ / ‖C64‖ (Frobenius), the largest relative error of a diagonal entry, and the
relative error of the Cholesky factor the fits whiten with (``convert.fits``'s ridge included).
"""

from __future__ import annotations

import argparse

import torch

from convert.calibrate import moment_hook, read_text, token_blocks
from convert.fits import whitener
from kvshrink import assets
from kvshrink_base.models import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(assets.smollm2(), dtype=torch.float32)
    blocks = token_blocks(
        tokenizer, read_text([str(assets.shakespeare()["train"])], args.tokens), args.tokens, args.seq_len
    )
    layers = model.model.layers
    walk: list = [None] * len(layers)
    exact: list = [None] * len(layers)

    def float64(index: int):
        def add(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            exact[index] = x.T @ x if exact[index] is None else exact[index] + x.T @ x

        return add

    for i, layer in enumerate(layers):
        layer.self_attn.q_proj.register_forward_pre_hook(moment_hook(walk, i))
        layer.self_attn.q_proj.register_forward_pre_hook(float64(i))
    with torch.inference_mode():
        for block in blocks:
            model(block.unsqueeze(0), use_cache=False)
    print(f"{blocks.numel():,} tokens in blocks of {args.seq_len}")
    print("| layer | ‖C32 − C64‖/‖C64‖ | worst diagonal | Cholesky factor |")
    print("|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(walk, exact)):
        whole = ((a - b).norm() / b.norm()).item()
        diagonal = ((a.diagonal() - b.diagonal()).abs() / b.diagonal().abs()).max().item()
        factor = ((whitener(a) - whitener(b)).norm() / whitener(b).norm()).item()
        print(f"| {i} | {whole:.2e} | {diagonal:.2e} | {factor:.2e} |")


if __name__ == "__main__":
    main()
