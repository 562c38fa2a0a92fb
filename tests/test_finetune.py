"""Fine-tuning with WeMask: settings and data checks, gradients under gradient checkpointing, SFT/DPO/GRPO steps
on tiny real checkpoints, agreement with plain TRL at rate 0, resume after a kill, the output directory."""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

import melayer
from melayer.finetuning import FinetuneConfig, finetune
from melayer.finetuning.data import (
    gsm8k_solution,
    gsm8k_train_file,
    load_records,
    plain_rows,
    trainer_rows,
    training_texts,
)
from melayer.interventions.wemask import wemask
from melayer.testing import tiny_lm
from melayer.util.errors import MelayerError

RATE = 0.1  # hidden 64 -> k = 6
FAST = dict(max_length=256, per_device_train_batch_size=2, logging_steps=1, progress=False, gradient_checkpointing=True)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def sft_file(tmp_path) -> Path:
    rows = [{"prompt": f"Q{i}: {i} plus {i}?", "completion": f"{i} + {i} = {2 * i}. #### {2 * i}"} for i in range(8)]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


# ----------------------------------------------------------------------------------------------------
# settings and data: checked before any model is loaded


@pytest.mark.parametrize("kwargs, message", [
    (dict(wemask=1.5), "--wemask must be in [0, 1]"),
    (dict(wemask="x"), "--wemask must be a number"),
    (dict(gamma=-0.1), "--gamma must be in [0, 1]"),
    (dict(method="ppo"), "unknown fine-tuning method"),
    (dict(learning_rate=0), "--learning-rate must be in (0"),
    (dict(per_device_train_batch_size=0), "--per-device-train-batch-size must be >= 1"),
    (dict(max_steps=0), "--max-steps must be >= 1"),
    (dict(data="/nonexistent.jsonl"), "no such file"),
    (dict(select="random"), "unknown --select"),
    (dict(method="grpo", per_device_train_batch_size=3, num_generations=2), "multiple of --num-generations"),
    (dict(max_memory="cpu"), "--max-memory 'cpu': give DEVICE=SIZE"),
    (dict(device_map="gpu-please"), "--device-map 'gpu-please'"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(MelayerError, match=message.replace("(", r"\(").replace("[", r"\[")):
        FinetuneConfig(**kwargs).validate()


def test_options_keep_trls_names_and_pass_the_rest_through(tmp_path):
    """FinetuneConfig's optimisation fields are TRL's own; ``trl_args`` reaches the method's TRL config, typed by
    its fields (text from the CLI converted), and a wrong key or value is one line before anything loads."""
    import dataclasses

    from trl import GRPOConfig, SFTConfig

    from melayer.finetuning.config import check_trl_args, parse_trl_options
    from melayer.finetuning.train import trainer_config

    trl_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                 "max_steps", "seed", "max_length", "save_steps", "logging_steps", "gradient_checkpointing"):
        assert name in trl_fields and name in {f.name for f in dataclasses.fields(FinetuneConfig)}
    given = parse_trl_options(["warmup_steps=3", "weight_decay=0.01", "lr_scheduler_type=cosine", "report_to=none",
                               "dataset_kwargs={\"skip_prepare_dataset\": false}", "hub_model_id=null"])
    cfg = FinetuneConfig(learning_rate=1e-3, per_device_train_batch_size=2, trl_args=given).validate()
    assert cfg.trl_args == {"warmup_steps": 3.0, "weight_decay": 0.01, "lr_scheduler_type": "cosine",
                            "report_to": "none", "dataset_kwargs": {"skip_prepare_dataset": False},
                            "hub_model_id": None}
    args = trainer_config(cfg, tmp_path)
    assert isinstance(args, SFTConfig) and args.learning_rate == 1e-3 and args.per_device_train_batch_size == 2
    assert args.warmup_steps == 3 and args.weight_decay == 0.01 and args.lr_scheduler_type.value == "cosine"
    assert args.report_to in ([], "none", ["none"])
    grpo = trainer_config(FinetuneConfig(method="grpo", per_device_train_batch_size=2, num_generations=2,
                                         trl_args={"top_p": 0.9}).validate(), tmp_path)
    assert isinstance(grpo, GRPOConfig) and grpo.top_p == 0.9
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg  # round trip, trl_args included
    old = {"schema": "melayer.finetune_config/1", "lr": 1e-3, "batch_size": 2, "grad_accum": 4, "epochs": 2.0}
    assert FinetuneConfig.from_dict(old) == FinetuneConfig(learning_rate=1e-3, per_device_train_batch_size=2,
                                                           gradient_accumulation_steps=4, num_train_epochs=2.0)
    for method, trl_args, message in (
            ("sft", {"warmup_step": 1}, "--trl warmup_step: not an option of TRL's SFTConfig; did you mean warmup_steps"),
            ("sft", {"top_p": 0.9}, "not an option of TRL's SFTConfig"),  # a GRPO option
            ("sft", {"warmup_steps": "soon"}, "--trl warmup_steps must be float"),
            ("sft", {"packing": "maybe"}, "--trl packing must be bool"),
            ("sft", {"weight_decay": "nan"}, "--trl weight_decay must be float"),
            ("sft", {"learning_rate": 1.0}, "melayer sets this one from its own option; use --learning-rate"),
            ("dpo", {"output_dir": "/elsewhere"}, "use --output")):
        with pytest.raises(MelayerError, match=message):
            check_trl_args(method, trl_args)
    with pytest.raises(MelayerError, match="give KEY=VALUE"):
        parse_trl_options(["warmup_steps"])
    from melayer.cli.finetune import finetune as command  # every setting is an option (the refusals name them)

    assert set(inspect.signature(command).parameters) == {f.name for f in dataclasses.fields(FinetuneConfig)
                                                          if f.name != "trl_args"} | {"trl"}
    with pytest.raises(MelayerError, match="unknown fine-tuning option 'lr'; did you mean learning_rate"):
        finetune(lr=1e-3, output=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_bad_data_fails_before_anything_is_written(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "a", "chosen": "b"}])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    for data, method, message in ((empty, "sft", "no examples"), (missing, "dpo", "lacks rejected"),
                                  (missing, "sft", "lacks completion"), (broken, "sft", "line 2 is not JSON")):
        out = tmp_path / f"out-{method}-{data.stem}"
        with pytest.raises(MelayerError, match=message):
            finetune(data=str(data), method=method, output=str(out), progress=False)
        assert not out.exists()


def test_vendored_gsm8k_train_matches_its_notice():
    raw = gzip.decompress(gsm8k_train_file().read_bytes())
    notice = (gsm8k_train_file().parent / "NOTICE.md").read_text()
    assert hashlib.sha256(raw).hexdigest() in notice
    assert len(raw.splitlines()) == 7473
    data = load_records("gsm8k", "sft", limit=3)
    rows = plain_rows(data, "sft")
    assert rows[0]["prompt"].startswith("Question: Natalia sold clips") and rows[0]["prompt"].endswith("Answer:")
    assert rows[0]["completion"] == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips " \
                                    "altogether in April and May.\n#### 72"
    assert gsm8k_solution("a <<1+1=2>>2 #### 2") == "a 2 #### 2"
    grpo = plain_rows(load_records("gsm8k", "grpo", limit=2), "grpo")
    assert grpo[0]["gold"] == "72"


def test_chat_format_and_training_texts():
    lm = tiny_lm("llama")
    lm.tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                                  "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rows = [{"prompt": "2+2?", "completion": "4 #### 4"}]
    conv = trainer_rows(rows, chat=True)
    assert conv[0]["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert conv[0]["completion"] == [{"role": "assistant", "content": "4 #### 4"}]
    text = training_texts(lm.tokenizer, rows, chat=True)[0]
    ids = lm.tokenizer(text)["input_ids"]
    assert ids.count(lm.tokenizer.bos_token_id) == 1 and ids[0] == lm.tokenizer.bos_token_id  # one BOS, not two
    plain = trainer_rows(rows, chat=False)
    assert plain[0]["completion"] == " 4 #### 4"


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
@pytest.mark.parametrize("on", [True, False])
def test_trainer_settings_use_no_deprecated_names(method, on, tmp_path):
    """melayer's TRL config spells checkpointing the way the installed transformers wants (transformers 5 warns
    about ``gradient_checkpointing*``), and the setting still reaches TRL, which reads the old attributes."""
    import warnings

    from melayer.finetuning.train import trainer_config

    cfg = FinetuneConfig(method=method, gradient_checkpointing=on, per_device_train_batch_size=2,
                         num_generations=2).validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = trainer_config(cfg, tmp_path)
    assert args.gradient_checkpointing is on  # what TRL's trainers read
    assert args.gradient_checkpointing_kwargs == ({"use_reentrant": False} if on else None)


# ----------------------------------------------------------------------------------------------------
# gradient checkpointing: the recomputed forward must mask exactly what the first pass masked


def _grads(lm, batch, checkpointing: str | None) -> dict[str, torch.Tensor]:
    model = lm.model
    model.train()
    if checkpointing is None:
        model.gradient_checkpointing_disable()
    else:
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout draws (GPT-2 has dropout on) in every run
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100), use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.gradient_checkpointing_disable()
    model.eval()
    return grads


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(a[k].pow(2).sum()) for k in a)
    return (num / den) ** 0.5


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "olmo2", "gpt2", "qwen3"])
@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_wemask_gradients_equal_with_and_without_checkpointing(model_type, mode):
    lm = tiny_lm(model_type)
    tok = lm.tokenizer
    tok.padding_side = "right"  # TRL's collators pad on the right
    batch = dict(tok(["hello there, friend", "hi you"], return_tensors="pt", padding=True))
    with wemask(lm, RATE, layers=[2, 3]):
        plain = _grads(lm, batch, None)
        checkpointed = _grads(lm, batch, mode)
    unmasked = _grads(lm, batch, None)
    assert _rel(plain, checkpointed) <= 1e-6
    assert _rel(plain, unmasked) > 1e-3  # the mask really acts in this step


def test_packed_batches_mask_every_sequence_start_or_are_refused():
    lm = tiny_lm("llama")
    first, second = [0, 10, 11, 12], [0, 20, 21]
    packed = torch.tensor([first + second])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    # eager attention: transformers builds no block-diagonal mask, the second sequence would see the first
    with wemask(lm, RATE, layers=[2, 3]), pytest.raises(MelayerError, match="packed batch"):
        lm.model(input_ids=packed, position_ids=positions)
    lm.model.set_attn_implementation("sdpa")  # block-diagonal mask from the restarting positions
    with wemask(lm, RATE, layers=[2, 3]) as wm, torch.no_grad():
        together = lm.model(input_ids=packed, position_ids=positions).logits[0]
        assert [r["position"] for r in wm.to_dict()["masked_tokens"]["2"]] == [0, 4]
        alone = lm.model(input_ids=torch.tensor([first])).logits[0]
        assert [r["position"] for r in wm.to_dict()["masked_tokens"]["2"]] == [0]
    torch.testing.assert_close(together[: len(first)], alone, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# the three trainers, a few steps each, on tiny real checkpoints


def test_sft_with_wemask_writes_the_output_directory(sft_file, tmp_path):
    lm = tiny_lm("llama")
    out = tmp_path / "sft"
    result = finetune(lm=lm, data=str(sft_file), output=str(out), wemask=RATE, max_steps=3, **FAST)
    assert result.steps == 3
    for name in ("adapter_config.json", "adapter_model.safetensors", "wemask.json", "train_log.jsonl",
                 "finetune.json", "finetune_config.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["schema"] == "melayer.finetune/1"
    assert saved["data"]["file_sha256"] == hashlib.sha256(sft_file.read_bytes()).hexdigest()
    mask = json.loads((out / "wemask.json").read_text())
    assert mask["rate"] == RATE and mask["k"] == 6 and mask["me_layer"] == 1 and mask["layers"] == [2, 3]
    assert mask["massive_token"]["first_token"] == "<bos>"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    with pytest.raises(MelayerError, match="already holds a fine-tuning run"):
        finetune(lm=lm, data=str(sft_file), output=str(out), max_steps=3, **FAST)


def test_dpo_steps(tmp_path):
    rows = [{"prompt": f"{i} plus {i} is", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(4)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = finetune(lm=tiny_lm("llama"), method="dpo", data=str(data), output=str(tmp_path / "dpo"),
                      wemask=RATE, max_steps=2, **FAST)
    assert result.steps == 2 and result.final_loss is not None


def test_dpo_on_gsm8k_builds_pairs_from_the_models_own_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("MELAYER_CACHE", str(tmp_path / "cache"))
    settings = dict(method="dpo", data="gsm8k", limit=2, rejected_max_new_tokens=4, max_steps=1, **FAST)
    result = finetune(lm=tiny_lm("llama"), output=str(tmp_path / "dpo"), **settings)
    pairs = result.to_dict()["pairs"]
    assert pairs["pairs"] == 2 and Path(pairs["cache"]).is_file()  # a random tiny model answers nothing right
    cached = Path(pairs["cache"]).read_text()
    again = finetune(lm=tiny_lm("llama"), output=str(tmp_path / "dpo2"), **settings)  # reads the cache
    assert again.to_dict()["pairs"]["cache"] == pairs["cache"] and Path(pairs["cache"]).read_text() == cached
    with pytest.raises(MelayerError, match="give --limit"):
        finetune(lm=tiny_lm("llama"), output=str(tmp_path / "dpo3"), **{**settings, "limit": None})


def test_grpo_steps(tmp_path):
    rows = [{"prompt": f"{i} plus {i} is", "answer": str(2 * i)} for i in range(4)]
    data = write_jsonl(tmp_path / "grpo.jsonl", rows)
    result = finetune(lm=tiny_lm("llama"), method="grpo", data=str(data), output=str(tmp_path / "grpo"),
                      wemask=RATE, max_steps=2, num_generations=2, max_completion_length=8,
                      **{**FAST, "per_device_train_batch_size": 2})
    assert result.steps == 2
    log = [json.loads(line) for line in (tmp_path / "grpo" / "train_log.jsonl").read_text().splitlines()]
    assert any("reward" in r for r in log)


# ----------------------------------------------------------------------------------------------------
# agreement with the peer: WeMask rate 0 = plain TRL, same data and seed


def test_rate_zero_equals_plain_trl(sft_file, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    result = finetune(lm=tiny_lm("llama"), data=str(sft_file), output=str(tmp_path / "ours"), wemask=0.0,
                      max_steps=3, seed=3, **FAST)
    ours = [json.loads(line)["loss"] for line in (tmp_path / "ours" / "train_log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]
    lm = tiny_lm("llama")
    rows = trainer_rows(plain_rows(load_records(str(sft_file), "sft"), "sft"), chat=False)
    args = SFTConfig(output_dir=str(tmp_path / "peer"), per_device_train_batch_size=2, learning_rate=2e-4,
                     max_steps=3, logging_steps=1, seed=3, data_seed=3, use_cpu=True, bf16=False,
                     max_length=256, report_to="none", save_strategy="no", disable_tqdm=True,
                     gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    peer = SFTTrainer(model=lm.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=lm.tokenizer,
                      peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    peer.train()
    theirs = [r["loss"] for r in peer.state.log_history if "loss" in r]
    assert len(ours) == len(theirs) == 3 and result.steps == 3
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-7)


# ----------------------------------------------------------------------------------------------------
# resume: a run killed after a checkpoint continues with no step lost or repeated, and ends where an
# uninterrupted run ends


class _Kill(Exception):
    pass


def test_killed_run_resumes(sft_file, tmp_path):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    settings = dict(data=str(sft_file), wemask=RATE, max_steps=4, save_steps=2, seed=1, **FAST)

    class KillAfter3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Kill()

    with pytest.raises(_Kill):
        finetune(lm=tiny_lm("llama"), output=str(tmp_path / "run"), callbacks=[KillAfter3()], **settings)
    assert not (tmp_path / "run" / "finetune.json").exists()
    resumed = finetune(lm=tiny_lm("llama"), output=str(tmp_path / "run"), resume=True, **settings)
    assert resumed.resumed_from and resumed.resumed_from.endswith("checkpoint-2")
    straight = finetune(lm=tiny_lm("llama"), output=str(tmp_path / "straight"), **settings)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["loss"] for r in log if "loss" in r] == pytest.approx([r["loss"] for r in ref if "loss" in r],
                                                                    rel=1e-5)
    a = load_file(tmp_path / "run" / "adapter_model.safetensors")
    b = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed.steps == straight.steps == 4
    with pytest.raises(MelayerError, match="settings differ"):
        finetune(lm=tiny_lm("llama"), output=str(tmp_path / "run"), resume=True, **{**settings, "learning_rate": 1e-3})


def test_cli_run_killed_with_sigkill_resumes(planted_dir, sft_file, tmp_path):
    """A real kill (SIGKILL, mid-run, possibly mid-save) of the command, then --resume: every step once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "melayer", "finetune", "sft", "--model", str(planted_dir), "--data", str(sft_file),
            "--wemask", str(RATE), "--max-steps", "60", "--save-steps", "3", "--per-device-train-batch-size", "2", "--max-length",
            "256", "--output", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MELAYER_QUIET": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "checkpoint-6" / "trainer_state.json").exists() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "finetune.json").exists()
    done = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 61))
    result = json.loads((out / "finetune.json").read_text())
    assert result["steps"] == 60 and result["resumed_from"]


# ----------------------------------------------------------------------------------------------------
# the real embedded model: the massive token under the training format


@pytest.mark.slow
def test_smollm2_massive_token_under_chat_template(smollm2):
    from melayer.finetuning.train import find_massive_token

    rows = plain_rows(load_records("gsm8k", "sft", limit=4), "sft")
    texts = training_texts(smollm2.tokenizer, rows, chat=True, n=4)
    me_layer, info = find_massive_token(smollm2, texts)
    assert info["first_token"] == "<|im_start|>"
    assert me_layer == 11 and info["massive_tokens"][0]["position"] == 0


# ----------------------------------------------------------------------------------------------------
# the adapter + its mask round trip, and the command line


def test_adapter_and_mask_round_trip(planted_dir, sft_file, tmp_path):
    import melayer
    from melayer.testing import tiny_lm as make

    out = tmp_path / "run"
    result = finetune(model=str(planted_dir), data=str(sft_file), output=str(out), wemask=RATE, max_steps=2,
                      **FAST)
    trained = result.lm
    saved = json.loads((out / "wemask.json").read_text())
    batch = melayer.encode(trained, ["hello there, friend", "hi"])
    with torch.no_grad(), wemask(trained, saved["rate"], layers=saved["layers"]):
        want = trained.model(**batch).logits
    lm = melayer.load(str(planted_dir), adapter=str(out), progress=False)
    assert lm.adapter_wemask is not None and lm.adapter_wemask.active and lm.adapter_wemask.layers == saved["layers"] == [3, 4]
    with torch.no_grad():
        got = lm.model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    bare = melayer.load(str(planted_dir), adapter=str(out), adapter_mask=False, progress=False)
    with torch.no_grad():
        unmasked = bare.model(**batch).logits
    assert bare.adapter_wemask is None and (unmasked - want).abs().max() > 1e-3
    from melayer.eval.lm_eval_model import MelayerLM

    wrapped = MelayerLM(pretrained=str(planted_dir), peft=str(out), batch_size=1)
    assert wrapped.wemask.active and wrapped.wemask.layers == [3, 4]
    with torch.no_grad():
        torch.testing.assert_close(wrapped.model(**batch).logits, want, rtol=1e-4, atol=1e-5)
    wrapped.wemask.remove()
    with pytest.raises(MelayerError, match="give no wemask="):
        MelayerLM(pretrained=str(planted_dir), peft=str(out), wemask=0.1)
    other = tmp_path / "other-base"
    make("qwen3").model.save_pretrained(other)
    trained.tokenizer.save_pretrained(other)
    with pytest.raises(MelayerError, match="was trained on"):
        melayer.load(str(other), adapter=str(out), progress=False)


def test_device_map_trains_resident_weights_and_refuses_offloaded_ones(planted_dir, sft_file, tmp_path, run_cli):
    """A device map that keeps every weight resident trains; one that offloads layers (whose weights accelerate
    reloads each forward, so updates would be lost and LoRA would sit on meta placeholders) is refused with one
    line before anything is written, through the API and the CLI."""
    import melayer

    done = finetune(model=str(planted_dir), data=str(sft_file), output=str(tmp_path / "auto"), device_map="auto",
                    max_steps=1, **FAST)  # on this CPU-only machine: every layer on the CPU
    assert done.steps == 1 and done.final_loss is not None and done.config["device_map"] == "auto"
    assert {p.device.type for p in done.lm.model.parameters()} == {"cpu"}
    split = melayer.load(str(planted_dir), device_map="auto", max_memory="cpu=300KB", progress=False)
    assert "disk" in split.model.hf_device_map.values()
    with pytest.raises(MelayerError, match="offloaded to the CPU or disk"):
        finetune(lm=split, data=str(sft_file), output=str(tmp_path / "api"), max_steps=1, **FAST)
    assert not (tmp_path / "api").exists()
    r = run_cli("finetune", "sft", "--model", planted_dir, "--data", sft_file, "--max-memory", "cpu=300KB",
                "--max-steps", "1", "--output", tmp_path / "cli")
    lines = r.stderr.strip().splitlines()  # (accelerate logs where it offloaded, then melayer's one line)
    assert r.returncode == 2 and lines[-1].startswith("melayer: error: cannot fine-tune"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and sum("melayer" in line for line in lines) == 1
    assert not (tmp_path / "cli").exists()


def test_cli_finetune(planted_dir, sft_file, tmp_path, run_cli):
    out = tmp_path / "cli"
    run = run_cli("finetune", "sft", "--model", planted_dir, "--data", sft_file, "--wemask", str(RATE),
                  "--max-steps", "2", "--per-device-train-batch-size", "2", "--max-length", "256", "--output", out,
                  "--trl", "warmup_steps=1", "--trl", "lr_scheduler_type=constant_with_warmup")
    assert run.returncode == 0, run.stderr
    for name in ("adapter_model.safetensors", "wemask.json", "train_log.jsonl", "loss_curve.png", "finetune.json"):
        assert (out / name).is_file(), name
    assert "Traceback" not in run.stderr
    saved = json.loads((out / "finetune.json").read_text())["config"]
    assert saved["trl_args"] == {"warmup_steps": 1.0, "lr_scheduler_type": "constant_with_warmup"}
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # TRL got both: one warmup step from 0, then the peak (melayer's default, linear decay, logs 2e-4 then 1e-4)
    assert [r["learning_rate"] for r in logged if "learning_rate" in r] == pytest.approx([0.0, 2e-4])
    gen = run_cli("generate", "--model", planted_dir, "--adapter", out, "-p", "hi", "--max-new-tokens", "3")
    assert gen.returncode == 0 and "saved mask" in gen.stderr, gen.stderr
    twice = run_cli("generate", "--model", planted_dir, "--adapter", out, "-p", "hi", "--wemask", "0.1")
    assert twice.returncode == 2 and "drop --wemask" in twice.stderr
    bad = run_cli("finetune", "sft", "--model", planted_dir, "--data", tmp_path / "none.jsonl", "--output",
                  tmp_path / "bad")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("melayer: error:") and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------------
# a user's own TRL trainer under ``with melayer.wemask(...)``


def _sft_under(mask_rate: float | None, rows, tmp_path, name: str):
    """One SFT step of TRL's own SFTTrainer on a tiny planted Llama, optionally inside ``with melayer.wemask``;
    returns (first logged loss, position-0 attention inputs seen by layer 2 during training, the mask, the LoRA
    B weights after the step)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from melayer.capture import Hooks, site_module

    lm = tiny_lm("llama", me_layer=1)
    args = SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=2, learning_rate=2e-4, max_steps=1,
                     logging_steps=1, seed=3, data_seed=3, use_cpu=True, bf16=False, max_length=64, report_to="none",
                     save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=lm.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=lm.tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    seen: list[torch.Tensor] = []

    def run(mask=None):
        with Hooks() as hooks:  # registered after the mask's hooks: sees what the attention gets
            hooks.pre(site_module(lm, 2, "attn_in"),
                      lambda m, a, k: seen.append((k.get("hidden_states", a[0] if a else None))[:, 0].detach().clone()),
                      with_kwargs=True)
            trainer.train()
        return mask

    if mask_rate is None:
        mask = run()
    else:
        with melayer.wemask(lm, mask_rate, me_layer=1) as wm:
            mask = run(wm)
    loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    # LoRA's B matrices start at zero: after one step they are -lr x Adam's normalised gradient
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    return loss, seen, mask, trained


def test_a_users_sft_trainer_trains_under_wemask(sft_file, tmp_path):
    rows = trainer_rows(plain_rows(load_records(str(sft_file), "sft"), "sft"), chat=False)
    plain_loss, plain_inputs, _, plain_b = _sft_under(None, rows, tmp_path, "plain")
    masked_loss, masked_inputs, wm, masked_b = _sft_under(0.1, rows, tmp_path, "masked")
    assert wm.k == 6 and wm.layers == [2, 3]
    # the attention of layer 2 got the first token with k dims zeroed, in every training forward
    assert masked_inputs and all(int((x == 0).sum(-1).min()) >= wm.k for x in masked_inputs)
    assert plain_inputs and all(int((x == 0).sum(-1).max()) < wm.k for x in plain_inputs)
    assert masked_loss != pytest.approx(plain_loss, rel=1e-6)  # the mask changed the forward ...
    assert plain_b.keys() == masked_b.keys() and any(not torch.equal(plain_b[n], masked_b[n]) for n in plain_b)  # ... and the gradients
    assert not wm._active  # removed when the block ended


# ----------------------------------------------------------------------------------------------------
# a method of the interventions registry on every training forward (WeMask and its controls)


class _CaptureQueryInputs:
    """A trainer callback: from the start of training to its end, keep what each layer's query projection gets
    (the attention input after every hook on the attention module), per training forward."""

    def __init__(self, lm, layers):
        self.lm, self.layers, self.seen = lm, layers, {layer: [] for layer in layers}

    def callback(self):
        from transformers import TrainerCallback

        from melayer.capture import Hooks

        outer, hooks = self, Hooks()

        class Capture(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                for layer in outer.layers:
                    q = outer.lm.layers[layer].self_attn.q_proj
                    q = getattr(q, "base_layer", q)
                    hooks.pre(q, lambda m, a, layer=layer: outer.seen[layer].append(a[0].detach().clone()))

            def on_train_end(self, args, state, control, **kwargs):
                hooks.remove()

        return Capture()


@pytest.mark.parametrize("spec", ["wemask:rate=0.1", "wemask_before:rate=0.1", "wemask_random_dims:rate=0.1,seed=3",
                                  "wemask_other_token:rate=0.1,seed=1", "wemask_me_only:rate=0.1"])
def test_a_registry_intervention_acts_in_every_training_forward_and_is_removed(spec, sft_file, tmp_path):
    lm = tiny_lm("llama")  # planted ME layer 1, hidden 64 -> k = 6, layers 0-3
    probe = melayer.encode(lm, ["hello there, friend", "hi"])
    with torch.no_grad():
        before = lm.model(**probe).logits
    capture = _CaptureQueryInputs(lm, range(lm.num_layers))
    result = finetune(lm=lm, data=str(sft_file), output=str(tmp_path / "run"), intervention=spec, max_steps=2,
                      callbacks=[capture.callback()], **FAST)
    record = result.to_dict()["intervention"]
    settings = record["settings"]
    assert record["spec"] == spec.split(":")[0] + ":" + spec.split(":")[1] and record["name"] == spec.split(":")[0]
    assert record["calibration"]["source"].startswith("the first 8 training examples")
    assert record["calibration"]["me_layer"] == 1 and settings["k"] == 6
    want_layers = {"wemask_before": [0], "wemask_me_only": [1]}.get(record["name"], [2, 3])
    assert settings["layers"] == want_layers
    assert json.loads((tmp_path / "run" / "wemask.json").read_text())["layers"] == want_layers  # re-applied on load
    position = settings["offset"] if settings["token"] == "offset" else 0
    assert record["name"] != "wemask_other_token" or position >= 1
    fixed = settings["fixed_dims"]
    assert (fixed is None) == (record["name"] in ("wemask", "wemask_me_only"))
    for layer, seen in capture.seen.items():
        assert seen, layer  # every layer saw the training forwards (2 steps, checkpointing re-runs them)
        for x in seen:
            target = x[:, position]  # TRL pads on the right: the masked token sits at the same index in every row
            if fixed is not None:
                zeroed = bool((target[:, fixed] == 0).all())
            else:
                zeroed = int((target == 0).sum(-1).min()) >= settings["k"]
            assert zeroed == (layer in want_layers), (layer, record["name"])
    # hooks gone: the base model (adapter disabled) computes exactly what it did before training
    model = result.trainer.model
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        after = model(**probe).logits
    assert torch.equal(before, after)
    assert all(not lm.layers[i].self_attn._forward_pre_hooks for i in range(lm.num_layers))


@pytest.mark.parametrize("options, message", [
    (dict(intervention="act"), "method act is not used in fine-tuning: a training-free, inference-time"),
    (dict(intervention="zerotuning:gamma=0.5"), "its gamma and heads are tuned on the frozen model's output entropy"),
    (dict(intervention="set_mean"), "a diagnostic of the frozen model"),
    (dict(intervention="set_zero"), "breaks the model by design"),
    (dict(intervention="wemask_nope"), "unknown method 'wemask_nope'"),
    (dict(intervention="wemask_before:rate=2"), "rate=2.0 is out of range"),
    (dict(intervention="wemask:rate=0.1", wemask=0.1), "give --wemask or --method (intervention=), not both"),
    (dict(intervention="wemask_before:rate=0.1", layers="2-3"), "--layers is a --wemask option"),
])
def test_methods_that_make_no_sense_in_training_are_refused_in_one_line(options, message, sft_file, tmp_path):
    with pytest.raises(MelayerError, match=re.escape(message)) as err:
        finetune(lm=tiny_lm("llama"), data=str(sft_file), output=str(tmp_path / "no"), max_steps=1, **options,
                 **FAST)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "no").exists()


def test_an_adapter_trained_under_a_control_is_loaded_with_that_control(planted_dir, sft_file, tmp_path):
    out = tmp_path / "run"
    result = finetune(model=str(planted_dir), data=str(sft_file), output=str(out), max_steps=1,
                      intervention="wemask_other_token:rate=0.1,seed=2", **FAST)
    settings = result.to_dict()["intervention"]["settings"]
    lm = melayer.load(str(planted_dir), adapter=str(out), progress=False)
    again = lm.adapter_wemask.to_dict()
    for key in ("layers", "fixed_dims", "token", "offset", "k"):
        assert again[key] == settings[key], key


def test_cli_finetune_refuses_an_inference_only_method_in_one_line(sft_file, tmp_path, monkeypatch, capsys):
    from conftest import cli_error

    out = tmp_path / "no"
    line = cli_error(monkeypatch, capsys, "finetune", "sft", "--data", sft_file, "-o", out, "--method", "set_zero",
                     alone=True)
    assert "method set_zero is not used in fine-tuning: a negative control that breaks the model" in line
    assert "trainable: wemask, wemask_before, wemask_random_dims, wemask_other_token, wemask_me_only" in line
    assert not out.exists()
