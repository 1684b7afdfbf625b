"""What the TRL 1.16 peer scripts share: their command line, their data and how they report their speed."""

import argparse
import json
import resource

import torch
from datasets import Dataset


def arguments(what: str, **extra: tuple) -> argparse.Namespace:
    """The shared flags; extra: a peer's own, name=(type, help), required."""
    ap = argparse.ArgumentParser()
    for name, (kind, text) in extra.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind, required=True, help=text)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help=f"JSONL of {what} records")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--fp32", action="store_true", help="bf16=False instead of TRL's default")
    ap.add_argument("--limit", type=int, default=0, help="train on the first N records only")
    return ap.parse_args()


def dataset(a: argparse.Namespace) -> Dataset:
    records = [json.loads(line) for line in open(a.data)]
    return Dataset.from_list(records[: a.limit] if a.limit else records)


def settings(a: argparse.Namespace) -> dict:
    """Only what the comparison fixes; everything else stays TRL's default."""
    return dict(output_dir=a.out + ".work", per_device_train_batch_size=a.batch, num_train_epochs=1,
                max_length=a.max_length, learning_rate=a.lr, report_to=[], save_strategy="no",
                include_num_input_tokens_seen="non_padding", seed=0,
                use_cpu=not torch.cuda.is_available(),  # on a CPU-only machine the trainer demands it
                **({"bf16": False} if a.fp32 else {}))


def write_speed(trainer, result, out: str) -> None:
    seconds = result.metrics["train_runtime"]
    json.dump({"precision": "bf16" if trainer.args.bf16 else "fp32", "train_runtime_s": seconds,
               "train_tokens": trainer.state.num_input_tokens_seen,
               "tokens_per_s": trainer.state.num_input_tokens_seen / seconds,
               "samples_per_s": result.metrics["train_samples_per_second"],
               "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "train_loss": result.training_loss, "threads": torch.get_num_threads()}, open(out, "w"))
