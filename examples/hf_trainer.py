"""Fine-tune with the Hugging Face Trainer and BlockAdamW, then resume from a checkpoint.

A small Llama from transformers.LlamaConfig (bf16) learns byte-level standard-library text (no
download, no tokenizer). The Trainer gets the optimizer through `optimizers=(BlockAdamW(...), None)`
and builds its own LR scheduler on it; `BlockAdamWCallback` checks the Trainer's arguments against
the optimizer. A second Trainer then resumes from the mid-run checkpoint and must end on exactly
the same weights. Runs on CPU in well under a minute.

    python examples/hf_trainer.py [--steps 40] [--update-in-backward] [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from stdlib_text import as_tokens, byte_llama, fixed_batches, split_by_file, stdlib_sources
from transformers import Trainer, TrainingArguments

from badam_kernels import BlockAdamW
from badam_kernels.hf import BlockAdamWCallback

# transformers 5.23 renamed gradient_checkpointing to activation_checkpointing and deprecated the old
# name; 5.17 (the oldest supported) has only the old one.
CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


class Windows(torch.utils.data.Dataset):
    """Causal-LM examples: each window of bytes is its own label."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


def make_trainer(cli, output_dir: str, train_rows, eval_rows) -> tuple[Trainer, torch.nn.Module]:
    model = byte_llama(layers=4, hidden=128, max_seq_len=cli.seq_len, seed=0).to(torch.bfloat16)
    accumulation = 2
    optimizer = BlockAdamW(
        model, lr=2e-3, weight_decay=0.01, switch_every=cli.steps // 8, switch_mode="random",
        update_in_backward=cli.update_in_backward,
        gradient_accumulation_steps=accumulation if cli.update_in_backward else 1,
        verbose=0,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=cli.steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        lr_scheduler_type="cosine",
        warmup_steps=cli.steps // 10,
        # The Trainer clips the active block's gradients; update_in_backward has none left to clip.
        max_grad_norm=0.0 if cli.update_in_backward else 1.0,
        **{CHECKPOINTING: cli.gradient_checkpointing},
        logging_steps=cli.steps // 4,
        save_strategy="steps",
        save_steps=cli.steps // 2,
        eval_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Windows(train_rows),
        eval_dataset=Windows(eval_rows),
        optimizers=(optimizer, None),
        callbacks=[BlockAdamWCallback()],
    )
    return trainer, model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--update-in-backward", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    cli = parser.parse_args()
    train_files, eval_files = split_by_file(stdlib_sources("*.py", max_bytes=2 << 20), eval_every=10)
    train_rows = torch.cat(fixed_batches(as_tokens(train_files), 8, cli.seq_len, cli.steps, seed=0))
    eval_rows = torch.cat(fixed_batches(as_tokens(eval_files), 8, cli.seq_len, 4, seed=1))

    with tempfile.TemporaryDirectory() as workdir:
        trainer, model = make_trainer(cli, f"{workdir}/run", train_rows, eval_rows)
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
        print(f"eval loss {before:.3f} -> {after:.3f} after {cli.steps} steps")

        halfway = f"{workdir}/run/checkpoint-{cli.steps // 2}"
        resumed, resumed_model = make_trainer(cli, f"{workdir}/resumed", train_rows, eval_rows)
        resumed.train(resume_from_checkpoint=halfway)
        same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
        print(f"resumed from {halfway.rsplit('/', 1)[-1]}: final weights identical to the full run: {same}")


if __name__ == "__main__":
    main()
