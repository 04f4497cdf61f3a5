"""The trainer on a tiny 4-bit model: what changes, what does not, and what is saved; running out of memory
(recomputation turned on, or what to change) and a diverging loss."""

import json
import math
import subprocess
import sys

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

import checkpoints
import device
import loss
import model_loading
import train_lora
from chat_labels import IGNORE, collate, pack_examples, tokenize_conversation
from chat_templates import end_of_turn_text
from conftest import HP, ROOT, SAMPLE, Crash, crash_at
from dataset_loader import load_dataset, split_validation
from device import autocast
from job import Hyperparameters, JobError
from loss import loss_sum
from model_loading import load_model, quantization_config, same_kernels_in_eval
from train_lora import train


def load_base(path):
    return same_kernels_in_eval(AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization_config(torch.float32), dtype=torch.float32).eval())


@pytest.fixture(scope="module")
def trained(tiny_qwen2, tmp_path_factory):
    conversations, _ = load_dataset(SAMPLE)
    hp = Hyperparameters(learning_rate=1e-3, batch_size=4, micro_batch_size=2, epochs=1, max_steps=3,
                         lora_rank=8, max_seq_length=512)  # val_fraction by default: one of 12 conversations
    out = tmp_path_factory.mktemp("run") / "adapter"
    events = []
    result = train(conversations, tiny_qwen2, out, hp, on_progress=events.append)
    return result, out, events


@pytest.mark.slow  # trains the tiny model
def test_lora_weights_change_and_the_4bit_base_does_not(trained, tiny_qwen2):
    result, _, _ = trained
    fresh = load_base(tiny_qwen2)
    trained_layers = {n.removeprefix("base_model.model.").removesuffix(".base_layer"): m
                      for n, m in result.model.named_modules() if isinstance(m, Linear4bit)}
    fresh_layers = {n: m for n, m in fresh.named_modules() if isinstance(m, Linear4bit)}
    assert trained_layers.keys() == fresh_layers.keys() and len(fresh_layers) == 14  # 7 linear layers x 2 blocks
    for name, layer in fresh_layers.items():
        assert torch.equal(trained_layers[name].weight.data.view(torch.uint8),
                           layer.weight.data.view(torch.uint8)), name
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: nonzero means it was trained
    assert all(not p.requires_grad for n, p in result.model.named_parameters() if "lora_" not in n)


@pytest.mark.slow  # trains the tiny model
def test_the_saved_adapter_is_16_bit_half_the_size_and_reproduces_the_trained_model(trained, tiny_qwen2, tmp_path):
    result, out, _ = trained
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.bfloat16 for t in saved.values())
    result.model.save_pretrained(tmp_path / "fp32")  # what PEFT writes as the weights train: fp32
    fp32 = load_file(tmp_path / "fp32" / "adapter_model.safetensors")
    assert saved.keys() == fp32.keys() and all(saved[k].shape == fp32[k].shape for k in saved)
    assert (sum(t.numel() * t.element_size() for t in saved.values()) * 2
            == sum(t.numel() * t.element_size() for t in fp32.values()))
    # the file: half the bytes of fp32, plus the same header of tensor names (a large share only for a tiny adapter)
    assert ((out / "adapter_model.safetensors").stat().st_size
            < 0.55 * (tmp_path / "fp32" / "adapter_model.safetensors").stat().st_size)
    ids = torch.tensor([[11, 42, 7, 300, 901, 5]])
    result.model.eval()
    with torch.no_grad():
        expected = result.model(ids).logits
        base = load_base(tiny_qwen2)(ids).logits
        reloaded = PeftModel.from_pretrained(load_base(tiny_qwen2), out).eval()(ids).logits
        exact = PeftModel.from_pretrained(load_base(tiny_qwen2), tmp_path / "fp32").eval()(ids).logits
    assert torch.allclose(expected, exact, atol=1e-5)
    # 16-bit rounding of the LoRA weights moves the logits by far less than training moved them
    adapter_effect = (expected - base).abs().max()
    assert adapter_effect > 1e-3 and (reloaded - expected).abs().max() < 0.01 * adapter_effect


@pytest.mark.slow  # trains the tiny model
def test_fp32_adapters_are_kept_on_request(tiny_qwen2, tmp_path):
    hp = Hyperparameters(max_steps=1, batch_size=2, max_seq_length=256, lora_rank=4, val_fraction=0,
                         adapter_dtype="float32")
    train(load_dataset(SAMPLE)[0][:4], tiny_qwen2, tmp_path / "adapter", hp)
    assert {t.dtype for t in load_file(tmp_path / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}
    config = json.loads((tmp_path / "adapter" / "training_config.json").read_text())
    assert config["effective"]["adapter_dtype"] == "float32"


@pytest.mark.slow  # trains the tiny model
def test_metrics_config_and_stop_tokens_are_saved(trained):
    result, out, events = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert (metrics["steps"] == 3 and math.isfinite(metrics["train_loss_last"])
            and math.isfinite(metrics["validation_loss"]))
    assert metrics["examples"] + metrics["validation_examples"] == 44 and metrics["validation_conversations"] == 1
    assert metrics["validation_examples"] >= 1 and metrics["warnings"] == []
    assert 0 < metrics["token_efficiency"] <= 1 and metrics["trained_tokens"] < metrics["tokens"]
    config = json.loads((out / "training_config.json").read_text())
    assert config["seed"] == 42 and config["plan"]["accumulation_steps"] == 2
    assert config["versions"]["bitsandbytes"] and config["hyperparameters"]["lora_rank"] == 8
    assert len((out / "training_log.jsonl").read_text().splitlines()) == 3
    tokenizer = AutoTokenizer.from_pretrained(out)
    generation = GenerationConfig.from_pretrained(out)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.eos_token == "<|im_end|>" and generation.eos_token_id == [im_end, endoftext]
    assert tokenizer.chat_template
    steps = [e["step"] for e in events if e.get("stage") == "training" and "loss" in e]
    assert steps == [1, 2, 3]
    saving = [e for e in events if e.get("stage") == "saving"]  # training stopped mid-epoch: the final validation loss
    assert saving and saving[0]["validation_loss"] == metrics["validation_loss"]
    assert config["effective"]["adapter_dtype"] == "bfloat16"
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.slow  # starts processes
def test_preview_cli_shows_the_trained_text(tiny_qwen2):
    run = subprocess.run([sys.executable, "train_lora.py", "preview", "--dataset", str(SAMPLE), "--base-model",
                          str(tiny_qwen2), "--limit", "2", "--json"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    preview = json.loads(run.stdout)
    pairs = [json.loads(line) for line in SAMPLE.read_text().splitlines()[1:3]]
    assert preview["eos_token"] == "<|im_end|>"
    assert [e["trained_text"] for e in preview["examples"]] == [[p["target_response"] + "<|im_end|>"] for p in pairs]


def trained_token_loss(model, tokenizer, conversations, max_seq_length=512):
    """Mean cross-entropy over the trained tokens of `conversations` (one sequence each)."""
    eot = end_of_turn_text(tokenizer)
    total = count = 0
    with torch.no_grad():
        for c in conversations:
            batch = collate([[tokenize_conversation(tokenizer, c, max_seq_length, eot)]], tokenizer.pad_token_id)
            total += float(loss_sum(model, batch))
            count += batch["trained_tokens"]
    return total / count


@pytest.mark.slow  # trains the tiny model
def test_learning_happens_on_the_sample(tiny_qwen2, tmp_path):
    conversations = load_dataset(SAMPLE)[0][:8]
    hp = Hyperparameters(learning_rate=1e-3, batch_size=1, epochs=15, lora_rank=8, lora_alpha=256, lora_dropout=0.0,
                         max_seq_length=512, warmup_steps=5, gradient_checkpointing=False)
    result = train(conversations, tiny_qwen2, tmp_path / "adapter", hp)
    model = result.model.eval()
    with model.disable_adapter():
        before = trained_token_loss(model, result.tokenizer, conversations)
    after = trained_token_loss(model, result.tokenizer, conversations)
    print(f"trained-token loss before {before:.3f}, after {after:.3f} ({after / before:.2f}x)")
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow  # starts processes
def test_the_cli_trains_and_a_cpu_run_is_reproducible(tiny_qwen2, tmp_path):
    args = ["--max-steps", "2", "--max-seq-length", "256", "--batch-size", "2", "--lora-rank", "4"]
    run = subprocess.run([sys.executable, "train_lora.py", "train", "--dataset", str(SAMPLE),
                          "--base-model", str(tiny_qwen2), "--output", str(tmp_path / "cli"), *args],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    hp = Hyperparameters(max_steps=2, max_seq_length=256, batch_size=2, lora_rank=4)
    train(load_dataset(SAMPLE)[0], tiny_qwen2, tmp_path / "api", hp)
    logs = [[json.loads(line)["loss"] for line in (tmp_path / d / "training_log.jsonl").read_text().splitlines()]
            for d in ("cli", "api")]
    # the same losses to float rounding: now and then the CLI's process sums a step's loss in another order, even the
    # first step's, before any update (7.958469 against 7.958474; 7.965368 against 7.965352, 2.0e-6 relative; seen on
    # this CPU only under pytest, the cause not found). Another seed or data order moves these losses by ~1e-2.
    assert len(logs[0]) == 2 and logs[0] == pytest.approx(logs[1], rel=1e-5)


def test_the_chunked_loss_equals_the_full_logits_loss_and_its_gradients(tiny_qwen2, monkeypatch):
    """The trainer never builds the full logits; its loss and LoRA gradients match the plain computation."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    eot = end_of_turn_text(tokenizer)
    examples = [tokenize_conversation(tokenizer, c, 512, eot) for c in load_dataset(SAMPLE)[0][:6]]
    batch = collate(pack_examples(examples, 1024)[:2], tokenizer.pad_token_id)
    hp = Hyperparameters(lora_rank=4, lora_dropout=0.0)
    torch.manual_seed(0)
    model = get_peft_model(load_base(tiny_qwen2), model_loading.lora_config(hp, "all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # a trained-looking adapter, so that gradients reach lora_A too

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    monkeypatch.setattr(loss, "LOSS_CHUNK_TOKENS", 100)  # several chunks
    chunked = loss.loss_sum(model, batch)
    chunked.backward()
    chunked_grads = grads()
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=IGNORE, reduction="sum")
    full.backward()
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) > 300
    assert torch.allclose(chunked, full, rtol=1e-5)
    for name, grad in grads().items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow  # trains the tiny model
def test_fp16_trains_with_a_loss_scale_that_backs_off_after_an_overflow_and_resumes_with_it(tiny_qwen2, tmp_path,
                                                                                          monkeypatch):
    """fp16 (GPUs without bf16) under autocast with dynamic loss scaling, on the CPU: a scale too large for fp16
    overflows the first steps' gradients; those steps are skipped (the weights do not move), the scale halves each
    time, then training goes on with finite losses. The scale is in the checkpoint, and a resumed job goes on with
    it."""
    monkeypatch.setattr(device, "FP16_INIT_SCALE", 2.0**26)  # fp16's largest value is ~2**16
    conversations = load_dataset(SAMPLE)[0][:16]
    hp = Hyperparameters(compute_dtype="float16", max_steps=20, batch_size=2, max_seq_length=384, lora_rank=4,
                         learning_rate=1e-3, warmup_steps=0, val_fraction=0, checkpoint_steps=5)
    events = []
    result = train(conversations, tiny_qwen2, tmp_path / "adapter", hp, on_progress=events.append,
                   checkpoint_dir=tmp_path / "checkpoints", fingerprint="fp16")
    steps = [e for e in events if "loss" in e and "grad_norm" in e]
    skipped = [e["step"] for e in steps if e["skipped"]]
    assert skipped[0] == 1 and len(skipped) < 20 and result.metrics["skipped_steps"] == len(skipped)
    scales = [2.0**26] + [e["loss_scale"] for e in steps]  # each step's scale after its update
    for event, before, after in zip(steps, scales, scales[1:]):  # halved after an overflow, kept after a clean step
        assert after == (before / 2 if event["skipped"] else before), event["step"]
        assert math.isfinite(event["loss"]) and (event["skipped"] or math.isfinite(event["grad_norm"]))
    assert result.metrics["loss_scale"] == scales[-1] < 2.0**26 and result.metrics["compute_dtype"] == "float16"
    trained = [e["learning_rate"] for e in steps if not e["skipped"]]
    assert len(trained) >= 5 and trained == sorted(trained, reverse=True)  # the schedule moves with the steps taken
    saved = torch.load(tmp_path / "checkpoints" / "checkpoint-20" / "state.pt", weights_only=True)
    assert saved["scaler"]["scale"] == scales[-1] and saved["state"]["skipped_steps"] == len(skipped)
    again = train(conversations, tiny_qwen2, tmp_path / "again", hp, checkpoint_dir=tmp_path / "checkpoints",
                  fingerprint="fp16").metrics  # resumed from the final checkpoint: the scale it had, not a new one
    assert (again["resumed_from_step"] == 20 and again["loss_scale"] == scales[-1]
            and again["skipped_steps"] == len(skipped))


def test_lora_layers_compute_in_the_compute_dtype_under_autocast(tiny_qwen2):
    """Without autocast PEFT casts each adapted layer's input to the fp32 LoRA weights (a copy kept for backward); under
    autocast the LoRA matmuls run in the compute dtype."""
    model, _ = load_model(tiny_qwen2, Hyperparameters(lora_rank=4), "cpu", torch.bfloat16, recompute=False)
    dtypes = []
    lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    lora_a.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    ids = torch.tensor([[5, 17, 99, 312]])
    model(ids)
    with autocast("cpu", torch.bfloat16):
        model(ids)
    assert dtypes == [torch.float32, torch.bfloat16]


# ---------------------------------------------------------------------------- the epoch delivered

def contradicted(n: int = 16) -> list[dict]:
    """The same question in every conversation; the trained answers say "Yes.", the held-out ones (the trainer's own
    split, val_fraction 0.25) "No.": the held-out loss falls while the shared format is learnt, then rises as "Yes."
    is. On the tiny model at BEST_HP: lowest at epoch 3 of 12, then up by about 0.3 (5.16, 4.90, 4.79, 5.07,
    5.13...)."""
    conversations = [{"conversation_id": f"c{i}",
                      "messages": [{"role": "user", "content": f"Question {i}: is it raining?"},
                                   {"role": "assistant", "content": "Yes."}]} for i in range(n)]
    for held_out in split_validation(conversations, BEST_HP["val_fraction"], BEST_HP["seed"])[1]:
        held_out["messages"][1]["content"] = "No."
    return conversations


BEST_HP = dict(learning_rate=1e-3, batch_size=1, epochs=12, lora_rank=16, lora_alpha=512, lora_dropout=0.0,
               max_seq_length=128, warmup_steps=0, val_fraction=0.25, packing=False, seed=42)
STEPS_PER_EPOCH = 12  # 16 conversations, 4 held out, batch 1


@pytest.fixture
def epoch_weights(monkeypatch):
    """The LoRA weights at each validation (an epoch's end), read by a spy on the trainer's evaluate."""
    seen, evaluate = {}, train_lora.evaluate

    def spy(run, sequences):
        seen[run.state.epoch] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(run.model).items()}
        return evaluate(run, sequences)

    monkeypatch.setattr(train_lora, "evaluate", spy)
    return seen


def delivered(out):
    return load_file(out / "adapter_model.safetensors")


def assert_delivers(out, weights):
    saved = delivered(out)
    assert saved.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(saved[name], tensor.to(saved[name].dtype)), name


@pytest.mark.slow  # trains the tiny model
def test_the_best_epoch_is_delivered_and_training_stops_once_patience_runs_out(tiny_qwen2, tmp_path, epoch_weights):
    hp = Hyperparameters(**BEST_HP, early_stopping_patience=2)
    result = train(contradicted(), tiny_qwen2, tmp_path / "adapter", hp)
    m = result.metrics
    losses = m["validation_losses"]
    print("validation loss per epoch:", [round(v, 4) for v in losses])
    best = 1 + losses.index(min(losses))
    assert 1 < best < len(losses), "the held-out loss must fall, then rise (the test's data is built for it)"
    assert m["best_epoch"] == best and m["stop_reason"] == "early_stopping" and m["epochs"] == len(losses) == best + 2
    assert m["validation_loss"] == min(losses) and m["steps"] == STEPS_PER_EPOCH * m["epochs"] < STEPS_PER_EPOCH * 12
    assert_delivers(tmp_path / "adapter", epoch_weights[best])
    kept = [json.loads(line) for line in (tmp_path / "adapter" / "training_log.jsonl").read_text().splitlines()
            if json.loads(line).get("validation_loss") == min(losses)]
    assert m["train_loss_kept"] == kept[0]["loss"] != m["train_loss_last"]
    assert json.loads((tmp_path / "adapter" / "metrics.json").read_text())["best_epoch"] == best


@pytest.mark.slow  # trains the tiny model
def test_patience_0_trains_every_epoch_and_still_delivers_the_best(tiny_qwen2, tmp_path, epoch_weights):
    m = train(contradicted(), tiny_qwen2, tmp_path / "adapter",
              Hyperparameters(**BEST_HP, early_stopping_patience=0)).metrics
    losses = m["validation_losses"]
    assert m["epochs"] == len(losses) == 12 and m["stop_reason"] == "epochs"
    assert m["best_epoch"] == 1 + losses.index(min(losses)) < 12
    assert_delivers(tmp_path / "adapter", epoch_weights[m["best_epoch"]])


@pytest.mark.slow  # trains the tiny model
def test_without_a_validation_set_the_last_epoch_is_delivered(tiny_qwen2, tmp_path, epoch_weights):
    hp = Hyperparameters(**{**BEST_HP, "val_fraction": 0, "epochs": 3})
    result = train(contradicted(), tiny_qwen2, tmp_path / "adapter", hp)
    m = result.metrics
    assert (epoch_weights == {} and m["best_epoch"] is None and m["validation_losses"] == []
            and m["validation_loss"] is None)
    assert m["stop_reason"] == "epochs" and m["epochs"] == 3 and m["train_loss_kept"] == m["train_loss_last"]
    assert_delivers(tmp_path / "adapter", get_peft_model_state_dict(result.model))


@pytest.mark.slow  # trains the tiny model
def test_a_job_resumed_after_its_best_epoch_delivers_that_epoch(tiny_qwen2, tmp_path, monkeypatch):
    """Crashed two epochs after its best one (a checkpoint in between), the job resumes and delivers the same weights
    as the run that was never interrupted: the best epoch's weights are in the checkpoint."""
    monkeypatch.setattr(checkpoints, "CHECKPOINT_TIME_SHARE", 1.0)  # a checkpoint at every epoch's end, however cheap
    hp = Hyperparameters(**{**BEST_HP, "epochs": 8}, early_stopping_patience=0, checkpoint_steps=STEPS_PER_EPOCH)
    whole = train(contradicted(), tiny_qwen2, tmp_path / "whole", hp).metrics
    assert whole["best_epoch"] <= 6  # the crash below comes after it
    best_step = whole["best_epoch"] * STEPS_PER_EPOCH
    crash = best_step + STEPS_PER_EPOCH + 5  # a checkpoint at the next epoch's end holds its weights and the best's

    def on_progress(event):
        if event.get("step") == crash and "loss" in event:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(contradicted(), tiny_qwen2, tmp_path / "adapter", hp, on_progress=on_progress,
              checkpoint_dir=tmp_path / "checkpoints", fingerprint="best")
    saved = torch.load(tmp_path / "checkpoints" / f"checkpoint-{best_step + STEPS_PER_EPOCH}" / "state.pt",
                       weights_only=True)
    assert saved["state"]["best_epoch"] == whole["best_epoch"] and saved["best"] is not None
    resumed = train(contradicted(), tiny_qwen2, tmp_path / "adapter", hp, checkpoint_dir=tmp_path / "checkpoints",
                    fingerprint="best").metrics
    assert resumed["resumed_from_step"] == best_step + STEPS_PER_EPOCH and resumed["best_epoch"] == whole["best_epoch"]
    assert resumed["validation_losses"] == pytest.approx(whole["validation_losses"], abs=1e-6)
    assert_delivers(tmp_path / "adapter", delivered(tmp_path / "whole"))


@pytest.fixture
def out_of_memory_once():
    """Arms a fault: the GPU running out of memory, once, in a decoder layer of a forward that trains,
    after `after` such layer calls (a CPU has no GPU memory to run out of; everything after the fault
    is real). Returns the list it appends each fault to (whether that layer was recomputing)."""
    faults, countdown = [], []

    def hook(module, args):
        if countdown and isinstance(module, Qwen2DecoderLayer) and torch.is_grad_enabled():
            countdown[0] -= 1
            if countdown[0] < 0:
                countdown.clear()
                faults.append(getattr(module, "gradient_checkpointing", False))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def arm(after: int = 0):
        countdown.append(after)
        return faults

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    yield arm
    handle.remove()


@pytest.mark.slow  # trains the tiny model
@pytest.mark.usefixtures("checkpoints_where_asked")
def test_auto_checkpointing_turns_on_when_a_step_runs_out_of_memory_and_redoes_it(conversations, tiny_qwen2, tmp_path,
                                                                                   out_of_memory_once, caplog):
    # no dropout: the failed attempt draws no random masks
    hp = dict(HP, max_steps=3, micro_batch_size=1, lora_dropout=0.0)
    reference = train(conversations, tiny_qwen2, tmp_path / "ref", Hyperparameters(**hp, gradient_checkpointing=True))
    faults = out_of_memory_once(after=2)  # in the step's second micro-batch, the first one's gradients already there
    result = train(conversations, tiny_qwen2, tmp_path / "auto", Hyperparameters(**hp, gradient_checkpointing="auto"))
    assert faults == [False]  # the fault came with recomputation off, as "auto" chose on this CPU
    assert result.metrics["recomputation"] == "on from step 1 (out of memory without it)"
    assert result.metrics["gradient_checkpointing"] is True
    assert "turning it on and redoing the step" in caplog.text
    layers = result.model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    # The step was redone from scratch: the same losses as a job that recomputed from the start.
    assert result.metrics["steps"] == reference.metrics["steps"] == 3
    ours = [json.loads(line)["loss"] for line in (tmp_path / "auto" / "training_log.jsonl").read_text().splitlines()]
    theirs = [json.loads(line)["loss"] for line in (tmp_path / "ref" / "training_log.jsonl").read_text().splitlines()]
    assert ours == pytest.approx(theirs, abs=1e-6)


@pytest.mark.slow  # trains the tiny model
@pytest.mark.usefixtures("checkpoints_where_asked")
def test_a_job_that_turned_checkpointing_on_resumes_with_it_on(conversations, tiny_qwen2, tmp_path, out_of_memory_once):
    faults = out_of_memory_once()
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(Crash):
        train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**HP), on_progress=crash_at(3),
              checkpoint_dir=checkpoints, fingerprint="job-oom")
    assert faults == [False]
    result = train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**HP),
                   checkpoint_dir=checkpoints, fingerprint="job-oom")
    assert faults == [False]  # no second fault was armed: nothing ran out of memory after the resume
    assert result.metrics["resumed_from_step"] == 2
    assert result.metrics["recomputation"] == "on from step 1 (out of memory without it)"
    assert result.metrics["gradient_checkpointing"] is True
    assert all(layer.gradient_checkpointing for layer in result.model.get_base_model().model.layers)


@pytest.mark.slow  # trains the tiny model
@pytest.mark.usefixtures("checkpoints_where_asked")
@pytest.mark.parametrize("setting, advice",
                         [(False, 'set it to "auto" or true'), (True, "reduce hyperparameters.micro_batch_size")])
def test_running_out_of_memory_with_checkpointing_chosen_fails_with_what_to_change(conversations, tiny_qwen2, tmp_path,
                                                                                   out_of_memory_once, setting, advice):
    faults = out_of_memory_once()
    with pytest.raises(JobError, match="ran out of memory at step 1") as caught:
        train(conversations, tiny_qwen2, tmp_path / "out", Hyperparameters(**HP, gradient_checkpointing=setting),
              checkpoint_dir=tmp_path / "checkpoints")
    assert advice in str(caught.value) and "resumes from the last checkpoint" in str(caught.value)
    assert faults == [setting] and not (tmp_path / "out").exists()


@pytest.mark.slow  # trains the tiny model
def test_a_diverging_loss_fails_the_job_before_the_step_spoils_the_adapter(tiny_qwen2, tmp_path, monkeypatch):
    monkeypatch.setattr(train_lora, "_backward", lambda *a, **k: float("nan"))  # the numerics' fault
    with pytest.raises(JobError, match=r"training diverged at step 1 \(loss nan.*lower hyperparameters.learning_rate"):
        train_lora.train(load_dataset(SAMPLE)[0][:4], tiny_qwen2, tmp_path / "adapter",
                         Hyperparameters(max_steps=2, batch_size=2, max_seq_length=256, val_fraction=0))
    assert not (tmp_path / "adapter").exists()
