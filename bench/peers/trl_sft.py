"""Peer: a plain SFT script on TRL 1.16's SFTTrainer with its default settings; only what the comparison
fixes (model, data, batch size, max length, learning rate, one epoch) is set. Writes its speed as JSON."""

from common import arguments, dataset, settings, write_speed
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

a = arguments("prompt/completion")
tokenizer = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model)
trainer = SFTTrainer(model=model, args=SFTConfig(**settings(a)), train_dataset=dataset(a), processing_class=tokenizer)
write_speed(trainer, trainer.train(), a.out)
