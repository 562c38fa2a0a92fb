"""Greedy generation, the one implementation: ``melayer generate`` / bench (texts, optional chat template) and the
eval engine (token rows, stop strings) both decode through :func:`greedy`.

An intervention (e.g. a :class:`~melayer.interventions.wemask.WeMask`) is whatever is applied around the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from melayer.capture import check_length, encode, eos_ids, pad_id
from melayer.models.chat import render_chat
from melayer.models.loading import LM
from melayer.util.errors import MelayerError


class _StopStrings:
    """Stopping criterion: a row is done once its generated text contains one of ``stop``."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_len: int) -> None:
        self.tokenizer, self.stop, self.prompt_len = tokenizer, list(stop), prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop:
            return done
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        for i, text in enumerate(texts):
            done[i] = any(s in text for s in self.stop)
        return done


@torch.no_grad()
def greedy(lm: LM, batch: dict[str, torch.Tensor], max_new_tokens: int, *, stop: Sequence[str] = (),
           stop_at_eos: bool = True) -> torch.Tensor:
    """Greedy KV-cached decoding of a left-padded batch; returns prompt + new ids. ``stop`` strings end a row
    early; ``stop_at_eos=False`` generates exactly ``max_new_tokens`` tokens (EOS suppressed), e.g. for timing."""
    from transformers import GenerationConfig, GenerationMixin, StoppingCriteriaList

    eos = eos_ids(lm)
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0 if stop_at_eos else max_new_tokens,
                              do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad_id(lm),
                              eos_token_id=eos or None, bos_token_id=lm.tokenizer.bos_token_id)
    prompt_len = batch["input_ids"].shape[1]
    check_length(lm, prompt_len + max_new_tokens, f"the prompt ({prompt_len} tokens) plus {max_new_tokens} new tokens")
    criteria = StoppingCriteriaList([_StopStrings(lm.tokenizer, stop, prompt_len)]) if stop else None
    model = cast(GenerationMixin, lm.model)  # a causal LM generates; PreTrainedModel's type does not say so
    return model.generate(**batch, generation_config=config, stopping_criteria=criteria)


def chat_prompt(lm: LM, text: str, chat: bool | None = None) -> tuple[str, bool]:
    """Wrap ``text`` in the tokenizer's chat template when asked (``chat=None``: when it has one)."""
    has_template = bool(getattr(lm.tokenizer, "chat_template", None))
    if chat and not has_template:
        raise MelayerError(f"--chat: the tokenizer of {lm.name} has no chat template")
    if chat is False or not has_template:
        return text, False
    rendered = render_chat(lm.tokenizer, [{"role": "user", "content": text}], name=lm.name)
    return rendered, True


@torch.no_grad()
def greedy_generate(lm: LM, texts: Sequence[str], max_new_tokens: int = 32, chat: bool | None = None,
                    stop_at_eos: bool = True) -> tuple[list[str], dict[str, torch.Tensor], torch.Tensor]:
    """Greedy KV-cached generation for a batch of texts (left padding).

    Args:
        lm: the loaded model.
        texts: the prompts (none empty).
        max_new_tokens: tokens to generate per prompt (at least 1).
        chat: wrap each prompt in the model's chat template: True, False, or None for the template when the
            model has one.
        stop_at_eos: stop a row at its end-of-sequence token; False generates exactly ``max_new_tokens``.

    Returns:
        ``(new_texts, batch, output_ids)``: the generated text of each prompt, the encoded input batch, and the
        input and generated token ids.

    Raises:
        MelayerError: an empty prompt or ``max_new_tokens < 1``.
    """
    if max_new_tokens < 1:
        raise MelayerError("--max-new-tokens must be >= 1")
    if not texts or any(not t.strip() for t in texts):
        raise MelayerError("empty prompt: every prompt must contain text")
    prompts = [chat_prompt(lm, t, chat) for t in texts]
    templated = any(used for _, used in prompts)
    # a rendered chat template already starts with the BOS text; do not add a second one
    batch = encode(lm, [p for p, _ in prompts], add_special_tokens=not templated)
    out = greedy(lm, batch, max_new_tokens, stop_at_eos=stop_at_eos)
    new = out[:, batch["input_ids"].shape[1]:]
    return lm.tokenizer.batch_decode(new, skip_special_tokens=True), batch, out
