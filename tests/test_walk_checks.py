"""The walk's limits and placement: positions checked before any work, BOS at the start of every calibration
block when asked for, and no block's output left on the device when the hidden states wait in CPU memory."""

import weakref
from pathlib import Path

import pytest
import torch
from textlm import train_tokenizer, write_corpus
from tiny import save_tiny

from convert import calibrate
from convert.cli import main
from convert.walk import HiddenStates

SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    train, _ = write_corpus(tmp_path_factory.mktemp("corpus"))
    return train, train_tokenizer(train)


def _source(family: str, corpus, path: Path, layers: int = 2) -> Path:
    return save_tiny(family, corpus[1], path, layers)  # 64 positions


def _convert(src: Path, out: Path, corpus, *flags) -> int:
    kv = "1" if src.name.startswith("gpt") else "2"
    return main(
        [
            str(src),
            str(out),
            "--kv-heads",
            kv,
            "--method",
            "aware",
            "--calibration-data",
            str(corpus[0]),
            "--calibration-tokens",
            "512",
            *map(str, flags),
        ]
    )


def _blocks(monkeypatch) -> list:
    seen = []
    open_walk = calibrate.open_walk

    def spy(*args):
        seen.append(args[5])
        return open_walk(*args)

    monkeypatch.setattr(calibrate, "open_walk", spy)
    return seen


@pytest.mark.parametrize("family", ["gpt2", "gpt_bigcode"])
def test_a_sequence_beyond_learned_positions_is_one_line_before_any_work(family, corpus, tmp_path, capsys):
    src = _source(family, corpus, tmp_path / f"{family}-src")
    capsys.readouterr()  # saving's progress bar
    for flags in ([], ["--dry-run"]):
        assert _convert(src, tmp_path / "out", corpus, "--calibration-seq-len", 128, *flags) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert errors == [
            "error: --calibration-seq-len 128 is beyond the model's learned positions: the model has "
            "64 positions; give --calibration-seq-len 64 or less"
        ]
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{family}-src"]
    assert _convert(src, tmp_path / "out", corpus, "--calibration-seq-len", 64) == 0  # the limit itself runs


def test_rotary_positions_beyond_the_trained_ones_warn_once_and_run(corpus, tmp_path, capsys):
    src = _source("llama", corpus, tmp_path / "llama-src")
    assert _convert(src, tmp_path / "out", corpus, "--calibration-seq-len", 128) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "beyond the 64 positions the model was trained on" in warnings[0]


def test_with_calibration_bos_every_block_starts_with_bos(corpus, tmp_path, monkeypatch):
    bos = corpus[1].bos_token_id
    src = _source("llama", corpus, tmp_path / "llama-src")
    seen = _blocks(monkeypatch)
    assert _convert(src, tmp_path / "with", corpus, "--calibration-seq-len", SEQ, "--calibration-bos") == 0
    assert _convert(src, tmp_path / "without", corpus, "--calibration-seq-len", SEQ) == 0  # the default
    with_bos, without = seen
    assert with_bos.shape == without.shape == (512 // SEQ, SEQ)
    assert (with_bos[:, 0] == bos).all()
    assert (with_bos[:, 1:] != bos).any() and not (without[:, 0] == bos).all()  # text follows; none added without
    assert torch.equal(with_bos[0, 1:], without[0, : SEQ - 1])  # the text fills the rest, in order
    seen.clear()
    assert (
        main(
            [
                str(src),
                str(tmp_path / "sampled"),
                "--kv-heads",
                "2",
                "--method",
                "aware",
                "--calibration-bos",
                "--calibration-tokens",
                "128",
                "--calibration-seq-len",
                "32",
            ]
        )
        == 0
    )  # data-free: sampled
    assert (seen[0][:, 0] == bos).all()


class _Tracking(HiddenStates):
    """Offloaded hidden states on a CPU standing in for a device: every tensor handed to ``keep`` is a device
    tensor (it is copied to 'CPU memory'); the most of them alive at once is counted."""

    alive: list = []
    most = calls = 0

    def keep(self, tensor):
        _Tracking.calls += 1
        refs = [r for r in _Tracking.alive if r() is not None]
        _Tracking.most = max(_Tracking.most, len(refs))
        _Tracking.alive = [*refs, weakref.ref(tensor)]
        return tensor.clone()


def test_offloaded_outputs_leave_the_device_as_they_are_made(corpus, tmp_path, monkeypatch):
    """16 blocks through 2 layers, sequential with the O refit and local steps: if outputs, heads' outputs or the
    attention's inputs piled up on the device before moving, up to 15 of them would be alive at once (moving
    the collected outputs after the pass, as the walk once did, gives 15)."""
    src = _source("llama", corpus, tmp_path / "llama-src")
    open_walk = calibrate.open_walk

    def forced(*args):
        return open_walk(*args, hidden_limit=1)  # the offload, as for states that do not fit the device

    monkeypatch.setattr(calibrate, "open_walk", forced)
    monkeypatch.setattr(calibrate, "HiddenStates", _Tracking)
    _Tracking.alive, _Tracking.most, _Tracking.calls = [], 0, 0
    assert (
        _convert(
            src,
            tmp_path / "out",
            corpus,
            "--calibration-seq-len",
            SEQ,
            "--calibration-order",
            "sequential",
            "--refit-o",
            "--local-steps",
            2,
        )
        == 0
    )
    # per layer: 16 outputs (the measuring pass keeps none), 16 heads' outputs, 16 attention inputs and 16
    # attention outputs; plus the first layer's inputs
    assert _Tracking.calls == 2 * 4 * 16 + 16
    assert _Tracking.most == 0, _Tracking.most  # each had left the device before the next was made
