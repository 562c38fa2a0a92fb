"""WeMask is really on during a fine-tuning run: plain PyTorch hooks on the transformers modules see, in every
training forward (and its gradient-checkpointing recomputation), the attention input of each masked layer equal
to the unmasked input with each row's first token's k largest-|a| dims zeroed (and nothing else changed), and the
first step's loss and gradient norm differ from those of the same step without the mask."""

from __future__ import annotations

import json

import torch

from melayer.finetuning import finetune
from melayer.testing import tiny_lm

RATE = 0.1  # hidden 64 -> k = 6
FAST = dict(max_length=256, per_device_train_batch_size=2, logging_steps=1, progress=False, gradient_checkpointing=True)


def _train_one_step(tmp_path, rate: float, name: str):
    data = tmp_path / "sft.jsonl"
    if not data.exists():
        rows = [{"prompt": f"Q{i}: {i} plus {i}?", "completion": f"{i} + {i} = {2 * i}. #### {2 * i}"}
                for i in range(4)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm = tiny_lm("llama")  # massive <bos> at layer 1: WeMask masks layers 2 and 3
    calls: dict[int, list] = {layer: [] for layer in (1, 2, 3)}
    handles = []
    for layer, log in calls.items():
        attn = lm.model.model.layers[layer].self_attn
        # registered before finetune applies WeMask: this pre-hook sees the input before WeMask's edit, and the
        # q projection (wrapped by peft, still called) sees it after
        handles.append(attn.register_forward_pre_hook(
            lambda m, a, kw, log=log: log.append(["in", (a[0] if a else kw["hidden_states"]).detach().clone()]),
            with_kwargs=True))
        handles.append(attn.q_proj.register_forward_pre_hook(
            lambda m, a, log=log: log[-1].extend([a[0].detach().clone(), torch.is_grad_enabled()])))
    try:
        finetune(lm=lm, data=str(data), output=str(tmp_path / name), wemask=rate, max_steps=1, seed=3, **FAST)
    finally:
        for h in handles:
            h.remove()
    log = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    step = next(r for r in log if "loss" in r)
    return calls, step


def test_a_finetuning_step_runs_under_the_mask(tmp_path):
    masked, step = _train_one_step(tmp_path, RATE, "masked")
    plain, plain_step = _train_one_step(tmp_path, 0.0, "plain")
    for layer, log in masked.items():
        training = [(pre, post) for _, pre, post, grad in log if grad]
        assert training, f"layer {layer}: no training forward seen"
        for pre, post in training:
            want = pre.clone()
            if layer in (2, 3):  # right-padded rows: each row's first token is column 0
                for row in range(pre.shape[0]):
                    want[row, 0, pre[row, 0].abs().topk(6).indices] = 0.0
            assert torch.equal(post, want), f"layer {layer}"
    for log in plain.values():
        assert all(torch.equal(pre, post) for _, pre, post, _ in log)
    assert step["loss"] != plain_step["loss"]
    assert step["grad_norm"] != plain_step["grad_norm"]
