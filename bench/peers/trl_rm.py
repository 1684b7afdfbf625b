"""Peer: a plain reward-model script on TRL 1.16's RewardTrainer with its default settings; only what the
comparison fixes (model, pairs, batch size, max length, learning rate, one epoch) is set. Writes its speed."""

from common import arguments, dataset, settings, write_speed
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

a = arguments("prompt/chosen/rejected")
tokenizer = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1)
model.config.pad_token_id = tokenizer.pad_token_id
trainer = RewardTrainer(model=model, args=RewardConfig(**settings(a)), train_dataset=dataset(a),
                        processing_class=tokenizer)
write_speed(trainer, trainer.train(), a.out)
