"""Outputs never destroy a person's files: export, merge and export-gguf write only into a new, empty or
studio-written folder (or file); anything else is refused in one line naming it and --force, which writes beside a
person's files and never replaces them. A real tiny run trained through the CLI (tiny_model_folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from studio.cli import main
from studio.core.data.dataset import demo_spec
from studio.core.files import MANIFEST


@pytest.fixture(scope="module")
def run_dir(tiny_model_folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-outputs")
    data = root / "train.jsonl"
    data.write_text("\n".join(Path(demo_spec().train_path).read_text().splitlines()[:8]) + "\n")
    run_file = root / "run.yaml"
    run_file.write_text(yaml.safe_dump({
        "model": {"source": str(tiny_model_folder), "device": "cpu"},
        "plan": {"targets": "q_proj,v_proj", "rank": 2},
        "data": {"train_path": str(data), "max_length": 96},
        "training": {"max_steps": 2, "batch_size": 4, "eval_every": 0, "save_every": 1, "spectrum_every": 0},
    }))
    assert main(["train", str(run_file), "--run-dir", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture()
def documents(tmp_path) -> Path:
    """A person's folder, as ~/Documents would be."""
    folder = tmp_path / "Documents"
    (folder / "photos").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    return folder


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("lora-studio: "), captured.err
    return captured.err[len("lora-studio: "):-1]


@pytest.mark.parametrize("command", ["export", "merge"])
def test_a_folder_holding_a_persons_files_is_refused_in_one_line_and_left_as_it_was(run_dir, documents, capsys,
                                                                                    command):
    before = contents(documents)
    assert main([command, str(run_dir), "--out", str(documents)]) == 2
    what = "adapter" if command == "export" else "merged model"
    assert one_line(capsys) == (f"{documents} holds files the studio did not write (photos, thesis.tex): choose a new "
                                f"or empty folder for the {what}, or use --force to write beside them (they are kept)")
    assert contents(documents) == before


@pytest.mark.parametrize("command", ["export", "merge"])
def test_force_writes_beside_a_persons_files_and_never_replaces_them(run_dir, documents, capsys, command):
    before = contents(documents)
    assert main([command, str(run_dir), "--out", str(documents), "--force"]) == 0
    after = contents(documents)
    assert {name: after[name] for name in before} == before
    written = "adapter_model.safetensors" if command == "export" else "model.safetensors"
    assert written in after and MANIFEST in after
    assert main([command, str(run_dir), "--out", str(documents), "--force"]) == 0  # again: its own files replaced
    assert {name: contents(documents)[name] for name in before} == before
    capsys.readouterr()


def test_exporting_again_replaces_the_studios_own_folder_without_force(run_dir, capsys):
    assert main(["export", str(run_dir)]) == 0
    assert main(["export", str(run_dir)]) == 0
    assert capsys.readouterr().out.count(f"adapter written to {run_dir / 'export'}") == 2
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == [MANIFEST, "README.md", "adapter_config.json",
                                                                      "adapter_model.safetensors"]


def test_the_current_folder_home_the_run_folder_and_a_file_in_the_way_each_get_their_line(run_dir, documents,
                                                                                          monkeypatch, capsys):
    monkeypatch.chdir(documents)
    assert main(["export", str(run_dir), "--out", "."]) == 2
    assert one_line(capsys).startswith(f"the current folder {documents} holds files the studio did not write")
    monkeypatch.setenv("HOME", str(documents))
    assert main(["merge", str(run_dir), "--out", "~", "--force"]) == 2
    assert one_line(capsys) == (f"will not write the merged model into the current folder {documents} itself: name a "
                                f"new folder inside it, e.g. {documents / 'merged-model'}")
    assert main(["export", str(run_dir), "--out", str(run_dir), "--force"]) == 2
    assert one_line(capsys) == (f"{run_dir} is a run folder: write the adapter to a new folder (one inside it is "
                                f"fine, e.g. {run_dir / 'export'})")
    assert main(["export", str(run_dir), "--out", "thesis.tex/adapter"]) == 2
    assert one_line(capsys) == ("cannot write the adapter to thesis.tex/adapter: thesis.tex is a file, not a folder")
    assert (documents / "thesis.tex").read_text() == "years of work"


def test_export_gguf_refuses_a_persons_file_and_keeps_their_modelfile(run_dir, documents, capsys):
    target = documents / "model.gguf"
    target.write_bytes(b"a person's model")
    (documents / "Modelfile").write_text("FROM ./llama3.gguf\n")
    assert main(["export-gguf", str(run_dir), "--out", str(target)]) == 2
    assert one_line(capsys) == (f"{target} exists and was not written by the studio: choose another name, or use "
                                "--force to replace it")
    assert target.read_bytes() == b"a person's model"

    assert main(["export-gguf", str(run_dir), "--out", str(target), "--force"]) == 0
    out = capsys.readouterr().out
    assert "ollama create NAME -f model.Modelfile" in out
    assert target.read_bytes()[:4] == b"GGUF" and (documents / "Modelfile").read_text() == "FROM ./llama3.gguf\n"
    assert (documents / "model.Modelfile").read_text().startswith("FROM ./model.gguf\n")
    assert (documents / "thesis.tex").read_text() == "years of work"
