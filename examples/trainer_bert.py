"""Fine-tune a small BERT classifier (built from a config, no download) with DPF through
transformers' Trainer, on a generated task: does token 7 occur more often than token 8?

    python examples/trainer_bert.py --sparsity 0.8 --steps 300
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import dpf_ext
from dpf_ext.hf import DPFCallback


class CountingTask(torch.utils.data.Dataset):
    """Sequences of 16 random tokens; label 1 if token 7 occurs more often than token 8."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 12, (n, 16), generator=g)
        self.labels = ((self.ids == 7).sum(1) > (self.ids == 8).sum(1)).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def accuracy(model, data: CountingTask) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data.ids).logits
    return (logits.argmax(1) == data.labels).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=16, num_labels=2)
    model = dpf_ext.sparsify(BertForSequenceClassification(config))
    train, test = CountingTask(4096, args.seed), CountingTask(1024, args.seed + 1)
    callback = DPFCallback(args.sparsity, update_every=16)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=32,
                                   learning_rate=1e-3, warmup_steps=20, logging_steps=50, report_to=[],
                                   save_strategy="no", use_cpu=True, seed=args.seed,
                                   disable_tqdm=True),
            train_dataset=train,
            callbacks=[callback],
        )
        trainer.train()
    print(callback.report)
    result = {"accuracy": accuracy(model, test), "sparsity": callback.report.sparsity,
              "reactivations": callback.report.reactivated_total}
    print(f"test accuracy {result['accuracy']:.2%} at {result['sparsity']:.1%} sparsity "
          f"({result['reactivations']} reactivations)")
    return result


if __name__ == "__main__":
    main()
