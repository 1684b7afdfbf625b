"""How the trainer stages batch their examples: by length (in an order a resumed run repeats), and packed into rows
instead of padded."""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler as _LengthGroupedSampler


class LengthGroupedSampler(_LengthGroupedSampler):
    """Batches of similar length (transformers' sampler) in an order drawn from seed + epoch: the trainer calls
    set_epoch, so a resumed run sees the same batches as an uninterrupted one (the stock sampler draws from the
    global RNG, which a resumed run restores only after the order is drawn)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


class LengthGrouping:
    """Trainer mixin: with train_sampling_strategy='group_by_length', training and evaluation batches come from
    LengthGroupedSampler (an order a resumed run repeats). A subclass says how long each example pads to."""

    def example_lengths(self, dataset) -> list[int]:
        raise NotImplementedError

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    self.example_lengths(dataset), self.args.seed)

    def _get_eval_sampler(self, eval_dataset):
        if self.args.train_sampling_strategy != "group_by_length" or eval_dataset is None:
            return super()._get_eval_sampler(eval_dataset)
        return LengthGroupedSampler(self.args.eval_batch_size, self.example_lengths(eval_dataset), self.args.seed)


class PackedRows:
    """A data collator: a batch's sequences (tokenized, with labels) packed into rows, first fit by
    decreasing length, instead of each padded to the longest. A row is as wide as the batch's longest
    sequence, so no more is computed than with padding, in the linear layers or in attention, and for a
    batch of mixed lengths much less. The rows carry position ids that restart at every sequence and no
    attention mask: the model reads the sequence boundaries from the positions and keeps the sequences
    apart (forwards.reads_packed_rows checks that it does). The batch trains on the same sequences, tokens
    and loss; only the padding is no longer computed.

    TRL's padding-free mode flattens a whole batch into one row instead, which outside FlashAttention costs
    attention over the full row (quadratic in the batch's tokens); its packing mode changes what a batch is
    (rows of max_length tokens, not batch_size sequences)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    @staticmethod
    def rows(lengths: list[int]) -> list[list[int]]:
        """Sequence indices per row, each row holding at most max(lengths) tokens."""
        rows, room, width = [], [], max(lengths)
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
            if fit is None:
                rows.append([i])
                room.append(width - lengths[i])
            else:
                rows[fit].append(i)
                room[fit] -= lengths[i]
        return rows

    def __call__(self, examples: list[dict]) -> dict:
        lengths = [len(e["input_ids"]) for e in examples]
        rows = self.rows(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # padding: one-token sequences
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = lengths[i]
                input_ids[r, at : at + n] = torch.tensor(examples[i]["input_ids"])
                labels[r, at : at + n] = torch.tensor(examples[i].get("labels", examples[i]["input_ids"]))
                labels[r, at] = -100  # a sequence's first token is not predicted from the one before it
                position_ids[r, at : at + n] = torch.arange(n)
                at += n
        # use_cache=False: with a cache the model builds an ordinary causal mask and ignores the boundaries
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}
