"""The training form: its tooltips are the run file's own field help, its starting values the demo run's, and the
run's length in optimizer steps or in epochs, each shown in the other for the data's example count and the batch,
and written to the run file as one or the other."""

from __future__ import annotations

from studio.core.runconfig import DEMO_TRAINING, RunConfig, TrainingConfig, field_help
from studio.ui.training_form import TrainingForm

FIELDS = {  # the form's widget -> the TrainingConfig field it edits
    "learning_rate": "learning_rate", "max_steps": "max_steps", "epochs": "epochs", "batch_size": "batch_size",
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


def test_a_run_in_epochs_shows_its_steps_and_writes_epochs(qtbot):
    form = TrainingForm()
    qtbot.addWidget(form)
    form.show()
    form.set_train_examples(300)
    form.batch_size.setValue(8)
    form.max_steps.setValue(60)
    assert form.length_hint.text() == "≈ 1.62 epochs" and form.max_steps.isVisible() and not form.epochs.isVisible()
    config = form.training_config()
    assert (config.max_steps, config.epochs) == (60, None)

    form.length_unit.setCurrentIndex(form.length_unit.findData("epochs"))
    form.epochs.setValue(2)
    assert form.epochs.isVisible() and not form.max_steps.isVisible()
    assert form.length_hint.text() == "= 74 steps" and form.max_steps.value() == 74  # 300 // 8 = 37 per epoch
    form.gradient_accumulation.setValue(2)
    assert form.length_hint.text() == "= 37 steps"
    config = form.training_config()
    assert (config.max_steps, config.epochs) == (None, 2.0)
    raw = RunConfig(plan={"targets": "all-linear"}, data={"train_path": "x"}, training=config).to_dict()
    assert RunConfig.from_dict(raw).training == config  # one of the two, as a run file must have it


def test_a_run_file_in_epochs_fills_the_form_in_epochs(qtbot):
    form = TrainingForm()
    qtbot.addWidget(form)
    form.set_training_config(TrainingConfig(max_steps=None, epochs=3.5))
    assert form.in_epochs() and form.epochs.value() == 3.5 and form.length_hint.text() == ""  # data not known yet
    form.set_training_config(TrainingConfig(max_steps=40))
    assert not form.in_epochs() and form.max_steps.value() == 40
