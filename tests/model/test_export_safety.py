"""`alia-nemo export` never deletes or writes through what it did not make, and never ships a broken model.

Before: ``--out`` was deleted whatever it was (``--out`` equal to ``--from`` wiped the run), and a run with
truncated weights exported with exit 0 into a directory that did not load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from alia_nemo.cli import main
from alia_nemo.model.export import EXPORT_INFO, ExportError, export


def tree(root: Path) -> dict[str, str]:
    """Every file and link under ``root`` (hidden ones too) -> a digest of its contents or target."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "link:" + str(p.readlink())
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _stage(run: Path, tok, seed: int = 0) -> Path:
    from tests.helpers import save_peaked_tiny_model

    save_peaked_tiny_model(run / "final", seed=seed)
    tok.save_pretrained(str(run / "final"))
    return run


@pytest.fixture
def run(tmp_path, tok) -> Path:
    """A local-engine-shaped run directory (final/ with weights, config, tokenizer) in its own folder."""
    return _stage(tmp_path / "runs" / "sft", tok)


def _export(args: list[str], capsys) -> tuple[int, str]:
    code = main(["export", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("where", ["the run", "its final/", "inside final/", "inside the run", "above the run"])
def test_out_overlapping_the_source_is_refused_and_nothing_changes(run, where, capsys):
    out = {"the run": run, "its final/": run / "final", "inside final/": run / "final" / "hf",
           "inside the run": run / "hf", "above the run": run.parent}[where]  # fmt: skip
    before = tree(run.parent)
    for force in ([], ["--force"]):
        code, err = _export(["--from", str(run), "--out", str(out), *force], capsys)
        assert code == 2 and "the source" in err and "Choose an --out outside the run directory" in err, err
        assert tree(run.parent) == before  # the run used to be deleted here


def test_a_user_directory_next_to_out_is_never_touched(run, tmp_path, capsys):
    """Staging is a fresh hidden mkdtemp directory, not `<out>.tmp`, which the user may own."""
    mine = tmp_path / "hf.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert _export(["--from", str(run), "--out", str(tmp_path / "hf")], capsys)[0] == 0
    assert (mine / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.tmp", "runs"]  # no staging left behind
    assert json.loads((tmp_path / "hf" / EXPORT_INFO).read_text())["source"] == str(run / "final")


def test_existing_out_needs_force_and_force_replaces_only_a_previous_export(run, tmp_path, tok, capsys):
    out = tmp_path / "hf"
    out.mkdir()  # an empty directory is fine
    assert _export(["--from", str(run), "--out", str(out)], capsys)[0] == 0
    first = tree(out)
    assert EXPORT_INFO in first and "model.safetensors" in first

    other = _stage(tmp_path / "runs" / "other", tok, seed=1)
    code, err = _export(["--from", str(other), "--out", str(out)], capsys)
    assert code == 2 and "exists and is not empty" in err and "--force" in err
    assert tree(out) == first

    assert _export(["--from", str(other), "--out", str(out), "--force"], capsys)[0] == 0
    second = tree(out)
    assert second["model.safetensors"] != first["model.safetensors"]
    assert json.loads((out / EXPORT_INFO).read_text())["source"] == str(other / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "runs"]  # the old export went, nothing else


def test_force_refuses_a_directory_export_did_not_write(run, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("two years of work")
    before = tree(out)
    code, err = _export(["--from", str(run), "--out", str(out), "--force"], capsys)
    assert code == 2 and f"is not a previous export (it has no {EXPORT_INFO})" in err
    assert tree(out) == before
    (tmp_path / "a-file").write_text("x")
    code, err = _export(["--from", str(run), "--out", str(tmp_path / "a-file"), "--force"], capsys)
    assert code == 2 and "exists and is not a directory" in err and (tmp_path / "a-file").read_text() == "x"


def test_force_refuses_a_previous_export_holding_other_files(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert _export(["--from", str(run), "--out", str(out)], capsys)[0] == 0
    (out / "eval_results.json").write_text("{}")
    (out / "plots").mkdir()
    before = tree(out)
    code, err = _export(["--from", str(run), "--out", str(out), "--force"], capsys)
    assert code == 2 and "also holds files export did not write (eval_results.json, plots)" in err
    assert tree(out) == before


def test_a_symlink_out_is_refused_and_its_target_untouched(run, tmp_path, capsys):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "data.bin").write_bytes(b"\0" * 10)
    link = tmp_path / "hf"
    link.symlink_to(target, target_is_directory=True)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "not-there")
    for out in (link, dangling):
        for force in ([], ["--force"]):
            code, err = _export(["--from", str(run), "--out", str(out), *force], capsys)
            assert code == 2 and "is a symbolic link" in err and "never writes through one" in err
    assert tree(target) == {"data.bin": hashlib.sha256(b"\0" * 10).hexdigest()}
    assert not (tmp_path / "not-there").exists() and link.is_symlink()


def test_a_failed_export_leaves_the_previous_one_and_no_staging(run, tmp_path, monkeypatch):
    import alia_nemo.model.export as ex

    out = tmp_path / "hf"
    export(run, out)
    before = tree(out)

    def broken(model_dir, *args):
        (model_dir / "half-written").write_text("x")
        raise ExportError("the tokenizer could not be written")

    monkeypatch.setattr(ex, "_finish", broken)
    with pytest.raises(ExportError, match="could not be written"):
        export(run, out, force=True)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "runs"]


def test_truncated_source_weights_are_refused_naming_the_file(run, tmp_path, capsys):
    earlier = run / "checkpoints" / "checkpoint-2"
    shutil.copytree(run / "final", earlier)
    weights = run / "final" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    code, err = _export(["--from", str(run), "--out", str(tmp_path / "hf")], capsys)
    assert code == 2
    assert f"the checkpoint at {run / 'final'} is incomplete or corrupt: {weights}: truncated" in err
    assert f"export an earlier checkpoint instead: --from {earlier}" in err
    assert not (tmp_path / "hf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert _export(["--from", str(earlier), "--out", str(tmp_path / "hf")], capsys)[0] == 0  # the advice works


def test_a_corrupt_nemo_rl_checkpoint_is_refused_before_conversion(tmp_path):
    """A truncated DCP file in the newest step_N: named, and the earlier steps are offered (no NeMo-RL needed)."""
    import warnings

    import torch
    from torch.distributed.checkpoint import FileSystemWriter, save

    ckpts = tmp_path / "run" / "checkpoints"
    for step in (5, 10):
        weights = ckpts / f"step_{step}" / "policy" / "weights"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one process, no group: what we mean here
            save({"model": {"w": torch.randn(16, 16)}}, storage_writer=FileSystemWriter(str(weights)), no_dist=True)
    distcp = next((ckpts / "step_10" / "policy" / "weights").glob("*.distcp"))
    with open(distcp, "r+b") as f:
        f.truncate(64)
    with pytest.raises(ExportError, match="incomplete or corrupt") as exc:
        export(tmp_path / "run", tmp_path / "hf")
    assert f"{distcp}: truncated" in str(exc.value) and f"--from {ckpts / 'step_5'}" in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_export_itself_is_checked_before_it_is_put_in_place(run, tmp_path, monkeypatch):
    import alia_nemo.model.export as ex

    finish = ex._finish

    def finish_then_disk_full(model_dir, *args):
        finish(model_dir, *args)
        with open(model_dir / "model.safetensors", "r+b") as f:  # as a copy cut short would leave it
            f.truncate(1000)

    monkeypatch.setattr(ex, "_finish", finish_then_disk_full)
    with pytest.raises(ExportError, match=r"the exported model failed its integrity check \(.*model.safetensors: "):
        export(run, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_engine_style_calls_keep_working(run, tmp_path):
    """write_final / the pipeline call export(source, out); re-exporting over their own output needs force=True."""
    final = tmp_path / "final"
    assert export(run / "final", final) == final
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(run / "final", final)
    assert export(run / "final", final, force=True) == final
    assert json.loads((final / EXPORT_INFO).read_text())["files"][0] == EXPORT_INFO
