"""Fixtures for the window's tests: a private settings file per test, the default model wrapped as the
loader would hand it to the window, and a window already showing it."""

from __future__ import annotations

import json

import pytest

LLAMA_70B_CONFIG = {  # Llama-3-70B's architecture; the studio builds it on the meta device (no weights)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


@pytest.fixture()
def settings(tmp_path):
    """A settings file in the test's folder, so no test reads or writes the user's own settings."""
    from PySide6.QtCore import QSettings

    return QSettings(str(tmp_path / "lora-studio.ini"), QSettings.IniFormat)


@pytest.fixture(scope="session")
def opened_default(default_model):
    """The session's default model, described exactly as the loader job describes it."""
    from studio.core.model import inventory
    from studio.ui.model_loader import OpenedModel, detect_machine

    tree = inventory.build(default_model.model, default_model.task)
    presets = {name: tuple(names) for name, names in inventory.presets(tree).items()}
    return OpenedModel("default", default_model, tree, presets, detect_machine())


@pytest.fixture()
def window(qtbot, settings, opened_default):
    from studio.ui.main_window import MainWindow

    win = MainWindow(settings)
    qtbot.addWidget(win)
    win.show()
    win.show_model(opened_default)
    return win


@pytest.fixture()
def llama_70b_config(tmp_path):
    path = tmp_path / "llama-70b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA_70B_CONFIG))
    return path


@pytest.fixture(scope="session")
def opened_tiny(tiny_model_folder):
    """The tiny random Llama (tiny_model_folder), described as the loader would: runs from the window in seconds."""
    from studio.core.model import inventory
    from studio.core.model.loading import open_model
    from studio.ui.model_loader import OpenedModel, detect_machine

    loaded = open_model(str(tiny_model_folder))
    tree = inventory.build(loaded.model, loaded.task)
    presets = {name: tuple(names) for name, names in inventory.presets(tree).items()}
    return OpenedModel(str(tiny_model_folder), loaded, tree, presets, detect_machine())
