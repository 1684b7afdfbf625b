"""Peer: a plain DPO script on TRL 1.16's DPOTrainer with its default settings; only what the comparison fixes
(SFT model, pairs, batch size, max length, learning rate, beta, one epoch) is set. TRL loads the reference
itself (a second copy of the model, as ours). Writes its speed as JSON."""

from common import arguments, dataset, settings, write_speed
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

a = arguments("prompt/chosen/rejected", beta=(float, "DPO beta"))
tokenizer = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model)
trainer = DPOTrainer(model=model, args=DPOConfig(**settings(a), beta=a.beta), train_dataset=dataset(a),
                     processing_class=tokenizer)
write_speed(trainer, trainer.train(), a.out)
