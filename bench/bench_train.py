"""Training throughput: what users pay for, measured for our trainer and a plain HF baseline in one run.

    python bench/bench_train.py --mode cpu            # tiny model, bundled sample (minutes, anywhere)
    python bench/bench_train.py --mode gpu            # Qwen2.5-7B and Mistral-7B built from their configs
                                                      # with random weights (no download); needs CUDA

Configurations, each on the same conversations (cpu mode: one whole epoch each; gpu mode: the same
number of optimizer steps), run `--repeats` times interleaved (cpu default 3, gpu 1), the best kept:
- `packed`: our trainer (`train_lora.train`), conversations packed into max_seq_length sequences;
- `padded`: our trainer with packing off: one conversation per sequence, padded to the longest of
  its micro-batch;
- `hf_trainer`: the usual QLoRA stack, for reference: transformers `Trainer` + PEFT + bitsandbytes,
  padding to the longest in the batch, no packing (same model, LoRA, data, steps and learning rate; otherwise
  that stack's usual choices: PEFT's k-bit preparation, which keeps embeddings, norms and lm_head in fp32,
  bf16 autocast, paged 8-bit AdamW).
- `packed_mb1_auto` (gpu mode): our trainer, the same batch one sequence per forward with
  `gradient_checkpointing: auto` (no recomputation where the estimate says it fits: for Qwen2.5-7B
  and Mistral-7B at 2048 tokens, ~38 GB estimated, so on any 48 GB or larger GPU).

Per configuration: time from job start to the first optimizer step, real tokens per second
(padding excluded) over the steady steps, token efficiency (real / computed tokens), peak memory
(GPU: `max_memory_allocated`; CPU: process RSS high-water mark, which only grows across the run),
and on GPU the MFU: 6·N FLOPs per real token with recomputation (4·N without; N: the parameters
less the input embedding, a lookup) over a bf16 matmul peak measured in the same run. Needs
beyond torch/transformers/peft: bitsandbytes, pydantic and matplotlib (the loss plot); runpod is
not needed. `scripts/device_wheels.sh` gathers the wheels a bare GPU image lacks. Writes
bench/results/<mode>-<date>.json and prints a table.

What is timed, exactly (both modes): `tokens_per_second` is the real tokens of steps 2..n divided by
the wall time from the end of step 1 to the end of step n (each end stamped when the trainer reports
the step, after its optimizer step and whatever the trainer does before reporting it); step 1 (first
kernels, compiles, allocator growth) is never in it. `first_step_seconds` runs from the configuration's
job start (labelling, model load and quantization included) to the end of its step 1 (with any compile
that an earlier run in the process did not leave cached).

cpu mode: one whole epoch per configuration, so the window also holds the epoch-end validation of
our trainer (nothing compiles on the CPU); a 2-step warm-up run first (the cold start).

gpu mode (and its `--allow-cpu` check), so that no compile and no evaluation falls inside a timed window:
- every run (warm-up or timed) starts from freed GPU memory: the previous run's objects dropped,
  `gc.collect()`, `torch.cuda.empty_cache()`, then `torch.cuda.reset_peak_memory_stats()`, so its peak is
  its own (`allocated_at_start_gb` in each row says what was still allocated: ~0);
- per model, before any timed run, an untimed warm-up run of our trainer for each chosen packed
  configuration (`packed`, `packed_mb1_auto`; `packed` alone when neither is chosen) on the fewest leading
  conversations that make one epoch of two full steps, then a short last step (the last short
  micro-batch) and the end-of-epoch evaluation: flex attention's compiles (training, the short
  micro-batch, evaluation) are done there, in the same process. The first warm-up's time to first step
  is the model's cold start; its step 2 gives `syncs_per_step`;
- the timed runs get enough copies of the sample that `--steps` optimizer steps stay inside the first
  epoch of every configuration (checked by labelling before, and by each run's log after): the window
  holds only full batches of one shape, never an evaluation nor the last short micro-batch. Each timed
  run's own end-of-training evaluation comes after its last step, outside the window.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataset_loader import load_dataset  # noqa: E402
from job import Hyperparameters  # noqa: E402
from measure import (build_random_model, fresh_gpu_memory, machine, matmul_peak_tflops,  # noqa: E402
                     model_flops_parameters, rss_peak_gb)

SAMPLE = ROOT / "data" / "brightrun-eq12-demo.jsonl"
CONFIGURATIONS = ("packed", "padded", "hf_trainer", "packed_mb1_auto")
CONFIGS = ROOT / "data" / "model-configs"


def conversations(copies: int) -> list[dict]:
    """The bundled sample's conversations (real BrightRun length distribution: long system prompt,
    several turns), repeated `copies` times with a marker so that none is a duplicate."""
    base = load_dataset(SAMPLE)[0]
    out = []
    for c in range(copies):
        for conv in base:
            messages = [dict(m) for m in conv["messages"]]
            messages[-1]["content"] += f" ({c})"
            out.append({"messages": messages})
    random.Random(0).shuffle(out)
    return out


def run_ours(convs, model_dir, hp: Hyperparameters, out_dir: Path, count_syncs: bool = False) -> dict:
    """One job of our trainer. With `count_syncs` on a GPU, torch's sync debug mode counts the
    operations that make the CPU wait for the GPU between the ends of the last two steps (it costs
    a Python warning each, so only the short warm-up run counts them)."""
    import warnings
    from contextlib import ExitStack

    import torch

    from train_lora import train

    timer_start = time.monotonic()
    stamps: list[float] = []
    syncs_at: list[int] = []
    counting = count_syncs and torch.cuda.is_available()
    with ExitStack() as stack:
        caught = stack.enter_context(warnings.catch_warnings(record=True)) if counting else []
        if counting:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, "default")

        def on_progress(event):
            if event.get("stage") == "training" and "loss" in event:
                stamps.append(time.monotonic())
                syncs_at.append(sum("synchroniz" in str(w.message) for w in caught))

        result = train(convs, model_dir, out_dir, hp, on_progress=on_progress)
    m = result.metrics
    history = [json.loads(line) for line in (out_dir / "training_log.jsonl").read_text().splitlines()]
    del result
    row = {"first_step_seconds": stamps[0] - timer_start,
           "tokens_per_second": _steady_tokens_per_second(stamps, history),
           "token_efficiency": m["token_efficiency"], "peak_memory_gb": m["peak_memory_gb"], "steps": m["steps"],
           "real_tokens": m["tokens"], "gradient_checkpointing": "on" if m["gradient_checkpointing"] else "off",
           "micro_batch_size": result_config(out_dir)["plan"]["micro_batch_size"], "epochs_begun": m["epochs"],
           "attention": m["attention"]}
    if counting and len(syncs_at) > 1:
        row["syncs_per_step"] = syncs_at[1] - syncs_at[0]  # step 2: a full step after the first, no evaluation in it
    return row


def result_config(out_dir: Path) -> dict:
    return json.loads((out_dir / "training_config.json").read_text())


def _steady_tokens_per_second(stamps: list[float], history: list[dict]) -> float:
    """Real tokens per second from the end of step 1 to the end of the last step (warm-up excluded)."""
    if len(stamps) < 2:
        return float("nan")
    return sum(r["real_tokens"] for r in history[1:]) / (stamps[-1] - stamps[0])


def padding_collator(pad_id: int, counted: dict):
    """Trainer's usual collate: pad to the longest, counting real and computed tokens into `counted`."""
    import torch

    from chat_labels import IGNORE

    def collate(batch):
        length = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), length), pad_id)
        labels = torch.full((len(batch), length), IGNORE)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
        counted["real"] += int(mask.sum())
        counted["computed"] += mask.numel()
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def trainer_arguments(hp: Hyperparameters, out_dir: Path, micro: int, device: str, dtype):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=micro,
        gradient_accumulation_steps=math.ceil(hp.batch_size / micro),
        max_steps=hp.max_steps or -1, num_train_epochs=hp.epochs, learning_rate=hp.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=hp.warmup_steps or 0,
        optim="paged_adamw_8bit" if device == "cuda" else "adamw_bnb_8bit", bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, logging_steps=10**9, save_strategy="no", report_to=[], seed=hp.seed,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=device == "cpu",
    )


def run_hf_trainer(convs, model_dir, hp: Hyperparameters, out_dir: Path) -> dict:
    """The usual QLoRA stack: Trainer + PEFT + bitsandbytes, pad to longest, no packing."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

    from chat_templates import load_tokenizer
    from labelled_data import label_conversations
    from device import select_precision
    from model_loading import lora_config, lora_targets, quantization_config

    started = time.monotonic()
    tokenizer, chat_format = load_tokenizer(Path(model_dir))
    eot = chat_format.end_of_turn
    examples, _ = label_conversations(tokenizer, convs, hp.max_seq_length, eot)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device, dtype = select_precision()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization_config(dtype), dtype=dtype,
                                                 attn_implementation="sdpa",
                                                 device_map={"": 0} if device == "cuda" else None)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=hp.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(hp, lora_targets(model, hp.lora_target_modules)))
    counted = {"real": 0, "computed": 0}
    collate = padding_collator(pad_id, counted)

    stamps: list[float] = []
    tokens_at: list[int] = []

    epochs_at: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.monotonic())
            tokens_at.append(counted["real"])
            epochs_at.append(state.epoch or 0.0)

    micro = hp.effective_micro_batch_size
    args = trainer_arguments(hp, out_dir, micro, device, dtype)
    data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Stamp()]).train()
    peak = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else rss_peak_gb()
    steady = (tokens_at[-1] - tokens_at[0]) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {"first_step_seconds": stamps[0] - started, "tokens_per_second": steady,
            "token_efficiency": counted["real"] / max(counted["computed"], 1), "peak_memory_gb": peak,
            "steps": len(stamps), "real_tokens": counted["real"], "micro_batch_size": micro,
            "gradient_checkpointing": "on" if hp.gradient_checkpointing else "off",
            "epochs_begun": max(1, math.ceil(epochs_at[-1] - 1e-9)) if epochs_at else 0, "attention": "sdpa"}


def timed_conversations(model_dir: Path, hp: dict, steps: int) -> list[dict]:
    """gpu mode: enough copies of the sample that `steps` optimizer steps stay inside the first epoch of every
    configuration, whole batches only (packing makes the fewest sequences; unpacked and the HF Trainer's rows,
    one per conversation, are at least as many), checked by labelling them as the trainer does."""
    from labelled_data import prepare_data

    batch, copies = hp["batch_size"], max(2, math.ceil((steps + 2) * hp["batch_size"] / 22))
    for _ in range(5):
        convs = conversations(copies)
        sequences = len(prepare_data(convs, model_dir, Hyperparameters(**{**hp, "packing": True})).train)
        if sequences >= (steps + 1) * batch:  # step `steps + 1` is whole too: no epoch end before it
            return convs
        copies = math.ceil(copies * (steps + 1) * batch / max(sequences, 1)) + 1
    raise RuntimeError(f"could not make {steps} steps of {batch} sequences fit in one epoch")


def warmup_conversations(convs: list[dict], model_dir: Path, hp: Hyperparameters) -> list[dict]:
    """The fewest leading conversations whose one epoch is two full optimizer steps, then a short last step,
    with a validation share (the end-of-epoch evaluation): the shapes of a whole job, for the warm-up run."""
    from labelled_data import prepare_data

    batch = hp.batch_size
    for k in range(2 * batch + 1, len(convs) + 1):
        data = prepare_data(convs[:k], model_dir, hp)
        if 2 * batch < len(data.train) < 3 * batch and data.validation:
            return convs[:k]
    raise RuntimeError("no leading subset of the conversations makes a warm-up epoch of 2 full steps and a short one")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per configuration")
    parser.add_argument("--max-seq-length", type=int, default=None)
    parser.add_argument("--configs", nargs="+", default=["qwen2.5-7b", "mistral-7b-v0.1"],
                        help="gpu mode: configs to build")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of each configuration, interleaved; the best is reported (default: cpu 3, gpu 1)")
    parser.add_argument("--only", nargs="+", choices=CONFIGURATIONS, default=None,
                        help="run only these configurations (default: all; packed_mb1_auto in gpu mode only)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run the gpu mode's flow on the CPU (to check it, not to measure)")
    parser.add_argument("--output", default=None, help="results file (default bench/results/<mode>-<date>.json)")
    args = parser.parse_args()

    import torch

    if args.mode == "gpu" and not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu mode needs CUDA; no GPU here. GPU figures: not yet measured.")
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        return run_all(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_all(args, work: Path) -> int:
    from tiny_model import build_tiny_model

    tiny = build_tiny_model("qwen2", work / "tiny-qwen2")
    gpu_mode = args.mode == "gpu"
    steps = args.steps or (30 if gpu_mode else None)  # cpu: one whole epoch, so every config sees the same data
    seq = args.max_seq_length or 2048
    base_hp = dict(max_steps=steps, epochs=1 if steps is None else 20, batch_size=8 if gpu_mode else 4,
                   max_seq_length=seq, lora_rank=16, warmup_steps=1, gradient_checkpointing=gpu_mode)
    # gpu mode: as many copies as keep the timed steps inside one epoch (the tiny tokenizer is every model's)
    convs = timed_conversations(tiny, base_hp, steps) if gpu_mode else conversations(copies=2)
    # gpu mode: each model is built from its config when its turn comes, and deleted after (~15 GB each)
    models = {"tiny-qwen2": None} if not gpu_mode else {
        config_file.stem: config_file for config_file in
        (Path(name) if name.endswith(".json") else CONFIGS / f"{name}.json" for name in args.configs)}
    chosen = args.only or [c for c in CONFIGURATIONS if gpu_mode or c != "packed_mb1_auto"]
    results = {"mode": args.mode, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "steps": steps,
               "max_seq_length": seq, "conversations": len(convs), "bf16_matmul_peak_tflops": matmul_peak_tflops(),
               "timed": ("tokens_per_second: real tokens of steps 2..n over the time from the end of step 1 to the "
                         "end of step n"
                         + (", all inside the first epoch (no evaluation, no short micro-batch); compiles done "
                            "by an untimed warm-up run per packed configuration" if gpu_mode else
                            ", one whole epoch (its end-of-epoch validation included)")),
               "models": {}}
    for name, config_file in models.items():
        path = tiny if config_file is None else build_random_model(config_file, tiny, work / name)
        row, cold = measure_model(args, work, name, path, convs, base_hp, chosen, results)
        results["models"][name] = row
        results.setdefault("cold_first_step_seconds", {})[name] = cold["first_step_seconds"]
        results.setdefault("syncs_per_step", {})[name] = cold.get("syncs_per_step")  # GPU only
        if config_file is not None:
            shutil.rmtree(path)
    add_headline(results, results["models"][next(iter(models))])  # the headline keys: the first model's
    out = Path(args.output) if args.output else ROOT / "bench" / "results" / f"{args.mode}-{results['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"-> {out}")
    return 0


def measured(run) -> dict:
    at_start = fresh_gpu_memory()  # the previous run's model and optimizer freed, the peak reset
    row = run()
    if at_start is not None:
        row["allocated_at_start_gb"] = at_start
    return row


def configuration_hp(base_hp: dict) -> dict:
    return {
        "packed": {**base_hp, "packing": True},
        "padded": {**base_hp, "packing": False},
        "hf_trainer": {**base_hp, "packing": False},
        # The same batch one sequence per forward with `gradient_checkpointing: auto`: does skipping the
        # recomputation, where the estimate allows it, pay for the smaller micro-batch? (not the same peak memory)
        "packed_mb1_auto": {**base_hp, "gradient_checkpointing": "auto", "packing": True, "micro_batch_size": 1},
    }


def cold_start(args, work: Path, name: str, path: Path, convs, base_hp: dict, chosen, results: dict) -> dict:
    """The untimed warm-up run(s) of a model; the first one's time to first step is the cold start."""
    config_hp = configuration_hp(base_hp)
    if args.mode != "gpu":
        # A one-step warm-up pays the imports, kernel initialisation and the first read of the weights
        # from disk (its time to first step is the cold start); the measured runs below are warm.
        return run_ours(convs, path, Hyperparameters(**{**base_hp, "max_steps": 2, "epochs": 20}),
                        work / f"{name}-warmup", count_syncs=True)
    # Untimed warm-up runs: one epoch of two full steps, a short last one and the evaluation, for each packed
    # configuration (flex attention compiles per shape); the first one's time to first step is the cold start.
    warm = [c for c in ("packed", "packed_mb1_auto") if c in chosen] or ["packed"]
    subset = warmup_conversations(convs, path, Hyperparameters(**config_hp["packed"]))
    warmups = {c: measured(lambda c=c: run_ours(
        subset, path, Hyperparameters(**{**config_hp[c], "max_steps": None, "epochs": 1}),
        work / f"{name}-warmup-{c}", count_syncs=True)) for c in warm}
    results.setdefault("warmup", {})[name] = {
        "conversations": len(subset), **{c: {k: r[k] for k in ("steps", "first_step_seconds", "attention")}
                                         for c, r in warmups.items()}}
    return warmups[warm[0]]


def measure_model(args, work: Path, name: str, path: Path, convs, base_hp: dict, chosen, results: dict):
    """Each chosen configuration's best run on one model (and every run's tokens/s), and the model's cold start."""
    gpu_mode, config_hp = args.mode == "gpu", configuration_hp(base_hp)
    cold = cold_start(args, work, name, path, convs, base_hp, chosen, results)
    runs = {
        "packed": lambda: run_ours(convs, path, Hyperparameters(**config_hp["packed"]), work / f"{name}-packed"),
        "padded": lambda: run_ours(convs, path, Hyperparameters(**config_hp["padded"]), work / f"{name}-padded"),
        "hf_trainer": lambda: run_hf_trainer(convs, path, Hyperparameters(**config_hp["hf_trainer"]),
                                             work / f"{name}-hf"),
        "packed_mb1_auto": lambda: run_ours(convs, path, Hyperparameters(**config_hp["packed_mb1_auto"]),
                                            work / f"{name}-mb1"),
    }
    # Repeated with the configurations interleaved, the best run of each kept (a shared machine's
    # slow spells then hit every configuration alike); every run's tokens/s is kept too.
    tries: dict[str, list[dict]] = {config: [] for config in CONFIGURATIONS if config in chosen}
    for _ in range(args.repeats or (3 if args.mode == "cpu" else 1)):
        for config, done in tries.items():
            row = measured(runs[config])
            if gpu_mode and row["epochs_begun"] != 1:  # an epoch end (evaluation, short batch) in the timed window
                raise RuntimeError(f"{name} {config}: its {row['steps']} timed steps crossed an epoch end")
            done.append(row)
    row = {config: {**max(done, key=lambda r: r["tokens_per_second"]),
                    "tokens_per_second_runs": [round(r["tokens_per_second"]) for r in done]}
           for config, done in tries.items()}
    if results["bf16_matmul_peak_tflops"]:
        n = model_flops_parameters(path)
        for r in row.values():
            recomputes = r["gradient_checkpointing"] != "off"
            r["mfu"] = ((6 if recomputes else 4) * n * r["tokens_per_second"]
                        / (results["bf16_matmul_peak_tflops"] * 1e12))
    return row, cold


def add_headline(results: dict, first: dict) -> None:
    for config in ("packed", "padded"):
        if config in first:
            results[f"token_efficiency_{config}"] = first[config]["token_efficiency"]
            results[f"tokens_per_second_{config}"] = first[config]["tokens_per_second"]
    for other in ("padded", "hf_trainer"):
        if "packed" in first and other in first:
            results[f"packed_over_{other}"] = first["packed"]["tokens_per_second"] / first[other]["tokens_per_second"]


def print_table(results: dict) -> None:
    print(f"{'model':<18}{'config':<16}{'micro':>6}{'recompute':>10}{'first step s':>13}{'real tok/s':>12}"
          f"{'efficiency':>11}{'peak GB':>9}{'MFU':>7}")
    for name, row in results["models"].items():
        for config, r in row.items():
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
            print(f"{name:<18}{config:<16}{r['micro_batch_size']:>6}{r['gradient_checkpointing'][:9]:>10}"
                  f"{r['first_step_seconds']:>13.1f}{r['tokens_per_second']:>12.0f}{r['token_efficiency']:>11.2f}"
                  f"{r['peak_memory_gb']:>9.2f}{mfu:>7}")
    for other in ("padded", "hf_trainer"):
        if f"packed_over_{other}" in results:
            print(f"packed / {other} real tokens per second: {results[f'packed_over_{other}']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
