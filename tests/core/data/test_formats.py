"""How one user prompt is wrapped for generation (the CLI's `generate`, the playground, the GGUF check)."""

from __future__ import annotations

import pytest
import torch

from studio.core.data.formats import chat_prompt, prompt_inputs
from studio.core.errors import DataError

PROMPT = "Write this date in ISO format: 7 June 1975"


def _reopened(default_model, template):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model.folder)
    tokenizer.chat_template = template
    return tokenizer


def test_a_prompt_becomes_the_user_turn_with_the_assistant_turn_opened(default_tokenizer):
    text = chat_prompt(default_tokenizer, PROMPT)
    assert text.endswith(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")

    inputs = prompt_inputs(default_tokenizer, PROMPT)

    expected = default_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                     return_tensors="pt", return_dict=True)
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(inputs["attention_mask"], torch.ones_like(inputs["input_ids"]))


def test_raw_prompts_and_tokenizers_without_a_template_give_the_plain_text(default_model, default_tokenizer):
    plain = default_tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert torch.equal(prompt_inputs(default_tokenizer, PROMPT, raw=True)["input_ids"], plain)

    no_template = _reopened(default_model, None)
    assert chat_prompt(no_template, PROMPT) is None
    assert torch.equal(prompt_inputs(no_template, PROMPT)["input_ids"], plain)


def test_a_template_that_refuses_a_lone_user_turn_is_one_data_error_and_the_gguf_probe_goes_plain(default_model):
    from studio.core.gguf.export import PROBE_MESSAGE, _probe

    strict = _reopened(default_model, "{{ raise_exception('the first message must be the system prompt') }}")
    with pytest.raises(DataError, match="rejects a lone user prompt: the first message must be the system prompt"):
        prompt_inputs(strict, PROMPT)
    assert _probe(strict)[0] == PROBE_MESSAGE
