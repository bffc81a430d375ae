"""OS errors (full or read-only output filesystem, denied permission, a path that cannot be a directory) end
every CLI with one line naming the path and the cause, exit code 2, and nothing left behind. We run as root,
where chmod stops nothing, so the failures are injected where the writes happen, or made real where the OS
refuses root too (a directory below a regular file)."""

import errno

import pytest
import yaml
from tiny import make_model

from convert import engine
from convert.cli import main as convert_main
from uptrain.__main__ import main as uptrain_main


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "llama"
    make_model("llama", 4).save_pretrained(path)
    return path


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "code, cause",
    [
        (errno.ENOSPC, "No space left on device"),
        (errno.EROFS, "Read-only file system"),
        (errno.EACCES, "Permission denied"),
    ],
)
def test_a_failing_write_is_one_line_and_leaves_nothing(source, tmp_path, capsys, monkeypatch, code, cause):
    def failing_write(path, *args, **kwargs):
        raise OSError(code, cause, str(path))

    monkeypatch.setattr(engine, "write_shard", failing_write)
    out = tmp_path / "out"
    assert convert_main([str(source), str(out), "--kv-heads", "1"]) == 2
    line = one_line(capsys)
    assert line.startswith("error: ") and cause in line and "model.safetensors" in line
    assert list(tmp_path.iterdir()) == []  # no OUTPUT, no temporary sibling


def test_too_little_free_space_is_refused_before_writing(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    assert convert_main([str(source), str(tmp_path / "out"), "--kv-heads", "2"]) == 2
    line = one_line(capsys)
    dry = convert_main([str(source), str(tmp_path / "dry"), "--kv-heads", "2", "--dry-run"])
    assert dry == 0
    assert "only 1,000 free" in line and "need" in line
    assert not (tmp_path / "out").exists()


def test_uptrain_output_that_cannot_be_a_directory(source, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"model": str(source), "output_dir": str(blocker / "run"), "data": {"train": [str(recipe)], "seq_len": 16}}
        )
    )
    assert uptrain_main([str(recipe)]) == 2
    line = one_line(capsys)
    assert line.startswith(f"error: output_dir {blocker / 'run'}") and "is a file" in line  # refused before any write
    assert blocker.read_text() == "not a directory"
