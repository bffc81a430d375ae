"""Compute options of the uptraining loop: train.compile, bf16 on CPU, the teacher under inference_mode, the
choice of fused loss (Liger Kernel) and its arithmetic against the chunked reference."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from test_uptrain import setup  # noqa: F401  (the module fixture is shared)
from tiny import make_model
from transformers import AutoModelForCausalLM

from uptrain import checkpoints, train
from uptrain.loss import chunked_loss, liger_loss, select_fused_loss
from uptrain.recipe import RecipeError, load_recipe


def recipe_at(tmp_path: Path, setup, name: str, **sections) -> Path:
    """A short run (4 steps of 4 x 64 tokens, logged every step) with ``sections`` merged in."""
    text, held, mha, mqa = setup
    recipe = {
        "model": str(mqa),
        "output_dir": str(tmp_path / name),
        "resume": "never",
        "data": {"train": [str(text)], "eval": [str(held)], "seq_len": 64},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "lr": 3.0e-3,
            "min_lr": 3.0e-4,
            "warmup_steps": 1,
            "loss_chunk_tokens": 64,
        },
        "eval": {"every_steps": 4, "max_tokens": 1024},
        "save": {"every_steps": 2, "keep_last": 2},
        "log": {"every_steps": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state (mixed precision included) per process: start and leave each test clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_compiled_run_matches_eager_and_its_checkpoints_load_without_prefixes(setup, tmp_path, monkeypatch):
    """aot_eager (no code generation; inductor needs minutes of C compilation on this CPU, see the bench)."""
    seen = {}
    save_final = checkpoints.save_final

    def spy(accelerator, model, *args):
        unwrapped = accelerator.unwrap_model(model)
        seen["compiled"] = unwrapped._compiled_call_impl is not None
        seen["weights"] = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
        return save_final(accelerator, model, *args)

    monkeypatch.setattr(checkpoints, "save_final", spy)
    train.run(load_recipe(recipe_at(tmp_path, setup, "eager")))
    assert seen["compiled"] is False
    compiled = recipe_at(tmp_path, setup, "compiled", train={"compile": True, "compile_backend": "aot_eager"})
    train.run(load_recipe(compiled))
    assert seen["compiled"] is True
    eager_losses, compiled_losses = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(compiled_losses) == 4 and compiled_losses[-1] < compiled_losses[0]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    final = load_file(tmp_path / "compiled" / "final" / "model.safetensors")
    step = load_file(tmp_path / "compiled" / "checkpoints" / "step-2" / "model.safetensors")
    assert not any("_orig_mod" in k for k in [*final, *step])
    for name, tensor in final.items():  # the final checkpoint is the in-memory model's weights, bit for bit
        assert torch.equal(tensor, seen["weights"][name]), name
    eager_final = load_file(tmp_path / "eager" / "final" / "model.safetensors")
    for name, tensor in final.items():
        assert torch.allclose(tensor, eager_final[name], rtol=0, atol=1e-4), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "compiled" / "final")
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, final["model.layers.0.self_attn.k_proj.weight"])
    # A compiled run resumes from its own step-2 checkpoint (load_state into the compiled module): same end.
    resumed = recipe_at(
        tmp_path,
        setup,
        "compiled",
        resume=str(tmp_path / "compiled" / "checkpoints" / "step-2"),
        train={"compile": True, "compile_backend": "aot_eager"},
    )
    train.run(load_recipe(resumed))
    for name, tensor in load_file(tmp_path / "compiled" / "final" / "model.safetensors").items():
        assert torch.allclose(tensor, final[name], rtol=0, atol=1e-6), name


def test_bf16_on_cpu_autocasts_keeps_fp32_master_weights_and_a_bf16_teacher(setup, tmp_path, monkeypatch):
    seen = []
    window_loss = train._Loop.window_loss

    def spy(self, window):
        student = self.acc.unwrap_model(self.model)
        if not seen:  # the dtype the student's attention projection computes in, under accelerate's autocast
            student.model.layers[0].self_attn.q_proj.register_forward_hook(
                lambda m, i, out: seen.append(("q_proj output", out.dtype))
            )
        result = window_loss(self, window)
        seen.append(("parameters", {p.dtype for p in student.parameters()}))
        seen.append(
            (
                "optimizer state",
                {
                    v.dtype
                    for s in self.optimizer.state.values()
                    for v in s.values()
                    if v.is_floating_point() and v.dim() > 0
                },
            )
        )
        seen.append(("teacher", {p.dtype for p in self.teacher.parameters()}))
        return result

    monkeypatch.setattr(train._Loop, "window_loss", spy)
    distill = {"teacher": str(setup[2]), "distill": {"weight": 0.5, "temperature": 2.0}}
    train.run(load_recipe(recipe_at(tmp_path, setup, "bf16", train={"precision": "bf16"}, **distill)))
    bf16 = dict(seen)
    assert bf16["q_proj output"] == torch.bfloat16
    assert bf16["parameters"] == {torch.float32} and bf16["optimizer state"] == {torch.float32}
    assert bf16["teacher"] == {torch.bfloat16}
    seen.clear()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # another precision in the same process
    train.run(load_recipe(recipe_at(tmp_path, setup, "fp32", train={"precision": "fp32"}, **distill)))
    assert dict(seen)["q_proj output"] == torch.float32 and dict(seen)["teacher"] == {torch.float32}
    # bf16 keeps 8 bits of mantissa: over 4 steps the loss stays within 2% of fp32's, yet is not fp32's.
    bf16_losses, fp32_losses = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    assert bf16_losses == pytest.approx(fp32_losses, rel=2e-2)
    assert bf16_losses != pytest.approx(fp32_losses, rel=1e-6)


@pytest.mark.parametrize("chunk", [64, 0], ids=["chunked", "full-logits"])
def test_teacher_under_inference_mode_gives_the_no_grad_losses_and_weights(setup, tmp_path, monkeypatch, chunk):
    modes = []
    teacher_output = train._Loop.teacher_output

    def spy(self, ids, **kwargs):
        output = teacher_output(self, ids, **kwargs)
        modes.append((output.hidden_states[-1] if kwargs else output.logits).is_inference())
        return output

    monkeypatch.setattr(train._Loop, "teacher_output", spy)
    runs = {}
    for inference in (False, True):
        name = f"inference-{inference}"
        train.run(
            load_recipe(
                recipe_at(
                    tmp_path,
                    setup,
                    name,
                    teacher=str(setup[2]),
                    train={"loss_chunk_tokens": chunk},
                    distill={"weight": 0.5, "temperature": 2.0, "teacher_inference_mode": inference},
                )
            )
        )
        runs[inference] = (losses(tmp_path / name), load_file(tmp_path / name / "final" / "model.safetensors"))
        assert set(modes) == {inference}  # the teacher really ran in that mode
        modes.clear()
    assert runs[True][0] == runs[False][0]  # same losses, step by step
    for key, tensor in runs[True][1].items():  # same gradients, hence the same weights after 4 AdamW steps
        assert torch.equal(tensor, runs[False][1][key]), key


def test_fused_loss_selection():
    assert select_fused_loss("auto", "cpu", False, available=True) == "chunked"
    assert select_fused_loss("auto", "cuda", False, available=False) == "chunked"
    assert select_fused_loss("auto", "cuda", False, available=True) == "liger"
    assert select_fused_loss("auto", "cuda", True, available=True) == "chunked"  # the JSD kernel has no bias
    assert select_fused_loss("off", "cuda", False, available=True) == "chunked"
    assert select_fused_loss("liger", "cuda", False, available=True) == "liger"
    with pytest.raises(RecipeError, match="pip install liger-kernel"):
        select_fused_loss("liger", "cuda", False, available=False)
    with pytest.raises(RecipeError, match="CUDA only; this run is on cpu"):
        select_fused_loss("liger", "cpu", False, available=True)
    with pytest.raises(RecipeError, match="no lm_head bias"):
        select_fused_loss("liger", "cuda", True, available=True)


def test_liger_requested_without_it_is_a_one_line_recipe_error(setup, tmp_path):
    import subprocess

    if __import__("importlib").util.find_spec("liger_kernel") is not None:
        pytest.skip("liger_kernel is installed here")
    recipe = recipe_at(tmp_path, setup, "liger", train={"fused_loss": "liger"})
    done = subprocess.run([sys.executable, "-m", "uptrain", str(recipe)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: train.fused_loss: liger needs Liger Kernel: "
        "`pip install liger-kernel` (CUDA only), or set train.fused_loss=auto"
    ]
    assert not (tmp_path / "liger").exists()  # failed before writing anything
    with pytest.raises(RecipeError, match="train.fused_loss: 'fast' is not one of auto, liger, off"):
        load_recipe(recipe, ["train.fused_loss=fast"])


def _reference_liger(monkeypatch):
    """liger_kernel.transformers.functional in plain torch, with the semantics read from liger-kernel 0.8.2's source
    (ops/fused_linear_cross_entropy.py, ops/fused_linear_jsd.py, ops/jsd.py): CE reduced as asked; JSD at beta 0 =
    sum over labelled tokens of KL(softmax(t/T) || softmax(z/T)) divided by their count, no T^2, no bias."""

    def fused_ce(x, w, target, bias=None, ignore_index=-100, reduction="mean"):
        return F.cross_entropy(F.linear(x, w, bias).float(), target, ignore_index=ignore_index, reduction=reduction)

    def fused_jsd(x, w, tx, tw, shift_labels=None, jsd_beta=0.5, ignore_index=-100, temperature=1.0):
        assert jsd_beta == 0.0
        keep = shift_labels != ignore_index
        log_q = (F.linear(x, w).float() / temperature).log_softmax(-1)[keep]
        log_p = (F.linear(tx, tw).float() / temperature).log_softmax(-1)[keep]
        return (log_p.exp() * (log_p - log_q)).sum() / keep.sum()

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy, functional.liger_fused_linear_jsd = fused_ce, fused_jsd
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)


@pytest.mark.parametrize(
    "family, weight, temperature", [("llama", 0.0, 1.0), ("llama", 0.5, 2.0), ("llama", 1.0, 0.7), ("phi", 0.0, 1.0)]
)
def test_liger_call_converts_to_our_loss_against_a_reference_with_its_semantics(
    monkeypatch, family, weight, temperature
):
    """Not Liger itself (Triton, CUDA): the wrapper's arithmetic (sum, x tokens, x T^2) against chunked_loss;
    phi's lm_head has a bias (CE only: the JSD kernel takes none)."""
    _reference_liger(monkeypatch)
    student = make_model(family, kv_heads=1, seed=0)
    teacher = make_model(family, kv_heads=4, seed=1)
    assert (student.lm_head.bias is not None) == (family == "phi")
    ids = torch.randint(0, student.config.vocab_size, (2, 9))
    grads = []
    for loss_fn in (
        lambda h, th: liger_loss(h, student.lm_head, ids, th, teacher.lm_head, weight, temperature),
        lambda h, th: chunked_loss(h, student.lm_head, ids, th, teacher.lm_head, weight, temperature, 5),
    ):
        student.zero_grad()
        hidden = student(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        with torch.no_grad():
            teacher_hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        loss, ce = loss_fn(hidden, teacher_hidden)
        loss.backward()
        grads.append(
            (
                loss.detach(),
                ce,
                student.lm_head.weight.grad.clone(),
                student.model.layers[0].self_attn.q_proj.weight.grad.clone(),
                *(() if student.lm_head.bias is None else (student.lm_head.bias.grad.clone(),)),
            )
        )
    for ours, reference in zip(*grads):
        assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_benchmarks_import_nothing_from_the_tests():
    import ast

    root = Path(__file__).parents[1]
    test_modules = {p.stem for p in (root / "tests").glob("*.py")}
    for script in (root / "bench").glob("*.py"):
        tree = ast.parse(script.read_text())
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {
            node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & (test_modules | {"tests"}), script.name
        assert '"tests"' not in script.read_text(), script.name  # no sys.path entry into tests/


def test_template_lists_every_key_of_these_sections_with_its_default():
    from dataclasses import asdict

    from uptrain.recipe import Distill, Eval, Log, Save, Train

    raw = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "template.yaml").read_text())
    for section, cls in (("train", Train), ("distill", Distill), ("eval", Eval), ("save", Save), ("log", Log)):
        assert raw[section] == asdict(cls()), section
