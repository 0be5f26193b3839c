"""A tiny LLaMA-Factory project made on the spot, nothing downloaded: a Llama built from
`LlamaConfig`, a byte-level BPE tokenizer trained here (`tokenizers`), 50 alpaca-format examples
with their `dataset_info.json`, and a YAML for `stage: sft`, `finetuning_type: full`,
`use_badam: true`. Used by tests/test_llamafactory.py and bench/llamafactory_timing.py.

    python examples/llamafactory_tiny.py OUT_DIR      # writes OUT_DIR/{model,data,train.yaml}
    python -m badam_kernels.llamafactory train OUT_DIR/train.yaml
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

DATASET = "tiny_alpaca"
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def alpaca_examples(count: int = 50, seed: int = 0) -> list[dict[str, str]]:
    """`count` alpaca records (instruction, input, output): sums, reversed words, counted letters."""
    rng = random.Random(seed)
    words = "block coordinate descent adam kernel fused layer switch memory gradient".split()
    examples = []
    for i in range(count):
        word = rng.choice(words)
        a, b = rng.randrange(100), rng.randrange(100)
        task = [
            ("Add the two numbers.", f"{a} and {b}", str(a + b)),
            ("Write the word backwards.", word, word[::-1]),
            ("How many letters does the word have?", word, f"It has {len(word)} letters."),
        ][i % 3]
        examples.append(dict(zip(("instruction", "input", "output"), task)))
    return examples


def write_tokenizer(folder: Path, texts: list[str], vocab_size: int = 400) -> Any:
    """Train a byte-level BPE tokenizer on `texts` and save it as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    fast.save_pretrained(folder)
    return fast


def write_model(folder: Path, vocab_size: int, layers: int = 4, hidden: int = 64, seed: int = 0) -> None:
    """A randomly initialised fp32 LlamaForCausalLM, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)


def write_project(folder: Path, layers: int = 4, hidden: int = 64, examples: int = 50) -> Path:
    """Model, tokenizer and dataset under `folder`; returns the model folder."""
    records = alpaca_examples(examples)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / f"{DATASET}.json").write_text(json.dumps(records, indent=1))
    (data / "dataset_info.json").write_text(json.dumps({DATASET: {"file_name": f"{DATASET}.json"}}))
    model = folder / "model"
    texts = [" ".join(r.values()) for r in records] + ["Human: Assistant:"]
    tokenizer = write_tokenizer(model, texts)
    write_model(model, len(tokenizer), layers, hidden)
    return model


def train_config(folder: Path, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """LLaMA-Factory's training arguments for the project in `folder` (full SFT with layer-wise
    BAdam, fp32 on the CPU, a loss logged at every step), with `overrides` applied."""
    config = {
        "model_name_or_path": str(folder / "model"),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "full",
        "use_badam": True,
        "badam_mode": "layer",
        "badam_switch_mode": "random",
        "badam_switch_interval": 5,
        "badam_verbose": 1,
        "dataset": DATASET,
        "dataset_dir": str(folder / "data"),
        "template": "default",
        "cutoff_len": 64,
        "overwrite_cache": True,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_steps": 20,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 4,
        "max_steps": 40,
        "seed": 42,
        "report_to": "none",
    }
    config.update(overrides)
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write `config` as YAML (JSON is valid YAML: no YAML writer needed)."""
    path.write_text(json.dumps(config, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    write_project(args.out_dir)
    config = write_config(args.out_dir / "train.yaml", train_config(args.out_dir, args.out_dir / "output"))
    print(f"python -m badam_kernels.llamafactory train {config}")


if __name__ == "__main__":
    main()
