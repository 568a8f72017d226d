"""How a run does on its validation examples: the validation loss, and task scores besides loss.

- exact_match (instruction and chat data): the prompt is everything before the example's last loss span, the
  reference is that span without its closing special tokens; greedy generations (batched, LEFT-padded) are compared
  with the reference after stripping surrounding whitespace. Generation stops at the reference's closing special
  token (the template's end of turn, or EOS) and after at most min(max_new_tokens, longest reference in the batch + 4)
  tokens: a matching answer is the reference's tokens plus a closing token or stray whitespace, and base models
  ramble (on two CPU cores each generated token of a batch costs about a second for the default model).
- accuracy (classification): argmax of the classifier's logits against the class ids.

`rounds` (a model sharded across processes, FSDP): every forward gathers weights from all processes, so each runs
exactly `rounds` batches, the ones past its own share on a stand-in that is not counted, and generation steps in
lockstep (a process whose batch is done keeps stepping until every process's is: transformers' synced_gpus).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from studio.core.data.dataset import IGNORE_INDEX, Example, PreparedData, collate

SPARE_TOKENS = 4


@dataclass(frozen=True)
class ScoreSample:
    prompt: str
    reference: str
    prediction: str
    correct: bool


@dataclass(frozen=True)
class ScoreResult:
    """`score` is the fraction correct among `n` scored examples (NaN when n is 0)."""

    name: str  # "exact_match" or "accuracy"
    score: float
    n: int
    samples: tuple[ScoreSample, ...]


def score(
    model: Any, tokenizer: Any, prepared: PreparedData, limit: int = 64, *, max_new_tokens: int = 64,
    batch_size: int = 16,
) -> ScoreResult | None:
    """The task score for the data's format on the first `limit` validation examples; None for plain text."""
    samples = score_samples(model, tokenizer, prepared, limit, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return None if samples is None else summarise(prepared.format, samples)


def score_samples(
    model: Any, tokenizer: Any, prepared: PreparedData, limit: int = 64, *, max_new_tokens: int = 64,
    batch_size: int = 16, shard: Callable[[Sequence[Example]], list[Example]] = list, rounds: int = 0,
) -> list[ScoreSample] | None:
    """The scored samples of `shard`'s share of the first `limit` validation examples (all of them by default;
    several processes each score their own share and `summarise` what they gathered); None for plain text."""
    examples = prepared.val[:limit]
    if not examples or prepared.format == "text":
        return None
    mine = shard(examples)
    if prepared.format == "classification":
        return list(accuracy(model, tokenizer, mine, prepared.label_names, batch_size=batch_size, rounds=rounds,
                             filler=examples[:1]).samples)
    return list(exact_match(model, tokenizer, mine, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            rounds=rounds).samples)


def summarise(fmt: str, samples: Sequence[ScoreSample]) -> ScoreResult:
    return _result("accuracy" if fmt == "classification" else "exact_match", list(samples))


def _normalise(text: str) -> str:
    return text.strip()


def _prompt_and_reference(example: Example) -> tuple[list[int], list[int]]:
    """Split an unpacked example before its last run of loss tokens."""
    loss = [label != IGNORE_INDEX for label in example.labels]
    end = len(loss) - loss[::-1].index(True)
    start = end
    while start > 0 and loss[start - 1]:
        start -= 1
    return list(example.input_ids[:start]), list(example.input_ids[start:end])


def exact_match(
    model: Any, tokenizer: Any, examples: Sequence[Example], *, max_new_tokens: int = 64, batch_size: int = 16,
    rounds: int = 0,
) -> ScoreResult:
    """Greedy generations against the references of instruction/chat examples. Truncated examples are left out
    (their reference is cut); `n` counts those scored."""
    import torch

    if any(e.position_ids is not None for e in examples):
        raise ValueError("exact_match needs unpacked examples (PreparedData.val is never packed)")
    special = set(tokenizer.all_special_ids)
    cases = []  # (prompt ids, reference text, closing token or None)
    for example in examples:
        if example.truncated or not any(label != IGNORE_INDEX for label in example.labels):
            continue
        prompt, reference = _prompt_and_reference(example)
        closing = reference[-1] if reference[-1] in special else None
        while reference and reference[-1] in special:
            reference.pop()
        cases.append((prompt, reference, closing))
    stops = sorted({c for _, _, c in cases if c is not None} | ({tokenizer.eos_token_id} - {None}))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    order = sorted(range(len(cases)), key=lambda i: len(cases[i][0]))  # similar lengths share a batch: less padding
    predictions: dict[int, list[int]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, len(order), batch_size):
                batch = order[first:first + batch_size]
                width = max(len(cases[i][0]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    prompt = cases[i][0]
                    input_ids[row, width - len(prompt):] = torch.tensor(prompt)
                    attention_mask[row, width - len(prompt):] = 1
                longest = max(len(cases[i][1]) for i in batch)
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    max_new_tokens=min(max_new_tokens, longest + SPARE_TOKENS), do_sample=False,
                    temperature=None, top_p=None, top_k=None, pad_token_id=pad_id, eos_token_id=stops,
                    use_cache=True, **({"synced_gpus": True} if rounds else {}),
                )
                for row, i in enumerate(batch):
                    generated = output[row, width:].tolist()
                    cut = next((k for k, t in enumerate(generated) if t in stops), len(generated))
                    predictions[i] = generated[:cut]
            for _ in range(rounds - math.ceil(len(order) / batch_size)):  # stand-ins: one token in, one out
                one = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
                model.generate(input_ids=one, attention_mask=torch.ones_like(one), max_new_tokens=1, do_sample=False,
                               temperature=None, top_p=None, top_k=None, pad_token_id=pad_id, eos_token_id=stops,
                               synced_gpus=True)
    finally:
        model.train(was_training)
    samples = []
    for i, (prompt, reference, _) in enumerate(cases):
        expected = _normalise(tokenizer.decode(reference, skip_special_tokens=True))
        predicted = _normalise(tokenizer.decode(predictions[i], skip_special_tokens=True))
        samples.append(ScoreSample(tokenizer.decode(prompt), expected, predicted, predicted == expected))
    return _result("exact_match", samples)


def accuracy(
    model: Any, tokenizer: Any, examples: Sequence[Example], label_names: Sequence[str] = (), *, batch_size: int = 16,
    rounds: int = 0, filler: Sequence[Example] = (),
) -> ScoreResult:
    """Share of classification examples whose highest logit is their class."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device

    def name(class_id: int) -> str:
        return label_names[class_id] if class_id < len(label_names) else str(class_id)

    samples = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, len(examples), batch_size):
                batch = examples[first:first + batch_size]
                tensors = collate(batch, pad_id)
                logits = model(input_ids=tensors["input_ids"].to(device),
                               attention_mask=tensors["attention_mask"].to(device)).logits
                for example, predicted in zip(batch, logits.argmax(-1).tolist()):
                    text = tokenizer.decode(example.input_ids, skip_special_tokens=True)
                    samples.append(ScoreSample(text, name(example.class_id), name(predicted),
                                               predicted == example.class_id))
            for _ in range(rounds - math.ceil(len(examples) / batch_size)):  # stand-ins, uncounted
                tensors = collate(filler, pad_id)
                model(input_ids=tensors["input_ids"].to(device), attention_mask=tensors["attention_mask"].to(device))
    finally:
        model.train(was_training)
    return _result("accuracy", samples)


def _result(name: str, samples: list[ScoreSample]) -> ScoreResult:
    correct = sum(s.correct for s in samples)
    return ScoreResult(name, correct / len(samples) if samples else float("nan"), len(samples), tuple(samples))


def validation_loss_sums(model: Any, examples: Sequence[Example],
                         collate: Callable[[Sequence[Example]], dict[str, Any]], *, batch_size: int, device: Any,
                         autocast: Callable[[], Any], is_lm: bool, rounds: int = 0,
                         filler: Sequence[Example] = ()) -> tuple[float, int]:
    """(summed loss, weight) over `examples`: the loss weighted by the tokens that carry it (by examples for
    classification), so that sums from several shards give the mean one big batch would. `filler`: the stand-in
    batch for `rounds` past this share."""
    import torch

    batches = [examples[start:start + batch_size] for start in range(0, len(examples), batch_size)]
    total, weight = 0.0, 0
    with torch.no_grad(), autocast():
        for i in range(max(len(batches), rounds)):
            batch = {k: v.to(device) for k, v in collate(batches[i] if i < len(batches) else filler).items()}
            # use_cache=False: with a cache, transformers ignores packed position_ids
            loss = model(**batch, use_cache=False).loss if "position_ids" in batch else model(**batch).loss
            if i >= len(batches):
                continue
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if is_lm else int(batch["labels"].numel())
            total += float(loss) * n
            weight += n
    return total, weight
