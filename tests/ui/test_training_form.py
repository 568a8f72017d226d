"""The training form: its tooltips are the run file's own field help, its starting values the demo run's."""

from __future__ import annotations

from studio.core.runconfig import DEMO_TRAINING, TrainingConfig, field_help
from studio.ui.training_form import TrainingForm

FIELDS = {  # the form's widget -> the TrainingConfig field it edits
    "learning_rate": "learning_rate", "max_steps": "max_steps", "batch_size": "batch_size",
    "gradient_accumulation": "gradient_accumulation", "warmup": "warmup_ratio", "schedule": "schedule",
    "eval_every": "eval_every", "eval_examples": "eval_examples", "save_every": "save_every",
    "spectrum_every": "spectrum_every", "gradient_checkpointing": "gradient_checkpointing", "seed": "seed",
}


def test_every_setting_shows_its_run_file_help_as_tooltip(qtbot):
    form = TrainingForm()
    qtbot.addWidget(form)
    tips = {widget: getattr(form, widget).toolTip() for widget in FIELDS}
    assert tips == {widget: field_help(TrainingConfig, name) for widget, name in FIELDS.items()}
    assert all(tips.values())


def test_the_form_starts_at_the_demo_run(qtbot):
    form = TrainingForm()
    qtbot.addWidget(form)
    assert form.training_config() == DEMO_TRAINING
