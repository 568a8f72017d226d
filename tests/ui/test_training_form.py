"""The training form's run length, in optimizer steps or in epochs: each shown in the other for the data's
example count and the batch, and written to the run file as one or the other."""

from __future__ import annotations

from studio.core.runconfig import RunConfig, TrainingConfig
from studio.ui.training_form import TrainingForm


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
