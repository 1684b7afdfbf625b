"""Real tokenizers' special tokens: every end a model declares ends a response, and the pad is none of them and
costs no embedding row where the tokenizer keeps a token for it. The tokenizers are built here, offline, with the
special tokens and generation configs that LLaMA-3, Qwen2 and Mistral instruct models ship."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from alignment import export, forwards, loading, ppo, registry, tokens
from alignment.store import Store

CORPUS = ["sort: d a c b", "a b c d hope this helps", "copy: a b", "the answer is a b c"] * 20
LLAMA_3 = {  # Meta-Llama-3.1-8B-Instruct: the tokenizer ends a turn with <|eot_id|>; generation_config lists three
    "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"],
    "tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "ends": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "spare_rows": 0,
}
QWEN_2 = {  # Qwen2-0.5B-Instruct: pads with <|endoftext|>, which its generation_config also lists as an end
    "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "ends": ["<|im_end|>", "<|endoftext|>"], "spare_rows": 64,  # its embedding has rows no token uses yet
}
MISTRAL = {  # Mistral-7B-Instruct-v0.2: no pad, one end
    "specials": ["<unk>", "<s>", "</s>"],
    "tokens": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "ends": ["</s>"], "spare_rows": 0,
}


def build(folder, kind: dict, drop: tuple = ()):
    """A model folder: a byte-level BPE tokenizer with kind's special tokens, a tiny LLaMA whose embedding has
    exactly the tokenizer's rows (plus kind's spare ones), and a generation_config.json listing kind's ends."""
    specials = [s for s in kind["specials"] if s not in drop]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **kind["tokens"])
    tokenizer.save_pretrained(folder)
    ends = [tokenizer.convert_tokens_to_ids(t) for t in kind["ends"]]
    config = LlamaConfig(vocab_size=len(tokenizer) + kind["spare_rows"], hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    GenerationConfig(eos_token_id=ends, bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    return folder, len(tokenizer), config.vocab_size


def ids(tokenizer, names) -> tuple:
    return tuple(tokenizer.convert_tokens_to_ids(n) for n in names)


@pytest.mark.parametrize("kind, pad, added", [
    (LLAMA_3, "<|finetune_right_pad_id|>", 0),  # LLaMA-3.1: the token kept for padding
    (dict(LLAMA_3, drop=("<|finetune_right_pad_id|>",)), "<|reserved_special_token_0|>", 0),  # LLaMA-3.0
    (QWEN_2, "<|pad|>", 1),  # its pad is an end: a new one, in a row the embedding already has
    (MISTRAL, "<|pad|>", 1),  # nothing to reuse: a new token and a new row, as before
], ids=["llama-3.1", "llama-3.0", "qwen2", "mistral"])
def test_every_declared_end_ends_and_the_pad_is_none_of_them(tmp_path, kind, pad, added):
    folder, vocabulary, rows = build(tmp_path / "model", kind, kind.get("drop", ()))
    spec = registry.get(str(folder), template="plain")
    tokenizer = loading.load_tokenizer(folder, spec)
    assert set(tokenizer.end_ids) == set(ids(tokenizer, kind["ends"]))
    assert tokenizer.end_ids[0] == tokenizer.eos_token_id  # the tokenizer's own end first
    assert tokenizer.pad_token == pad and tokenizer.pad_token_id not in tokenizer.end_ids
    assert len(tokenizer) == vocabulary + added
    model = loading.load_model(folder, AutoModelForCausalLM, spec, tokenizer=tokenizer)
    assert model.get_input_embeddings().num_embeddings == max(rows, len(tokenizer))  # grows only where it must
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_a_response_ends_at_any_declared_end(tmp_path):
    """Generation stops at <|eom_id|> (not the tokenizer's EOS), pads after it, and the masks of PPO and the
    held-out evaluation end there too."""
    folder, *_ = build(tmp_path / "model", LLAMA_3)
    spec = registry.get(str(folder), template="plain")
    tokenizer = loading.load_tokenizer(folder, spec)
    model = loading.load_model(folder, AutoModelForCausalLM, spec, tokenizer=tokenizer)
    eom, eot = ids(tokenizer, ["<|eom_id|>", "<|eot_id|>"])
    steps = iter(range(100))

    def third_token_is_eom(module, args, logits):  # two ordinary tokens, then <|eom_id|>
        if next(steps) == 2:
            logits = logits.clone()
            logits[..., eom] += 1e4
        logits[..., [eot, tokenizer.eos_token_id]] -= 1e4  # never the tokenizer's own EOS
        return logits

    model.lm_head.register_forward_hook(third_token_is_eom)
    _, _, responses = forwards.generate(model, tokenizer, ["sort: b a"] * 2, 6, 1.0, greedy=True)
    assert responses.shape[1] == 3 and (responses[:, 2] == eom).all()  # stopped at once, every row done
    mask, ended = ppo.response_mask(responses, tokens.end_ids(tokenizer))
    assert ended.all() and mask.sum(1).tolist() == [3, 3]
    assert ppo.response_mask(responses, tokenizer.eos_token_id)[1].tolist() == [False, False]  # one id: not ended


def test_response_mask_takes_several_ends():
    responses = torch.tensor([[5, 7, 9, 7], [5, 8, 5, 5], [9, 9, 9, 9]])
    mask, ended = ppo.response_mask(responses, (7, 8))
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]
    assert ppo.response_mask(responses, 7)[0].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_a_checkpoint_made_before_keeps_its_pad(tmp_path, tiny_cache):
    """A tokenizer saved by an earlier version, with <|pad|> added, loads with that pad and the same vocabulary."""
    spec = registry.get("tiny-llama")
    before = loading.load_tokenizer(registry.resolve(spec), spec)
    before.save_pretrained(tmp_path)
    again = loading.load_tokenizer(tmp_path, spec)
    assert (again.pad_token, len(again)) == (before.pad_token, len(before)) == ("<|pad|>", len(before))
    assert again.end_ids == (again.eos_token_id,)


def test_an_exported_policy_stops_at_every_end_with_plain_transformers(tmp_path, tiny_cache):
    folder, _, rows = build(tmp_path / "model", LLAMA_3)
    spec = registry.get(str(folder), template="plain")
    tokenizer = loading.load_tokenizer(folder, spec)
    store = Store(tmp_path / "store")
    checkpoint = store.run_dir("run") / "sft"
    model = loading.load_model(folder, AutoModelForCausalLM, spec, tokenizer=tokenizer)
    model.save_pretrained(checkpoint)
    loading.save_tokenizer(tokenizer, checkpoint, spec)
    (checkpoint / "manifest.json").write_text(json.dumps({"id": "run/sft", "stage": "sft", "model": str(folder),
                                                          "template": "plain", "uid": "u", "metrics": {}}))
    out = tmp_path / "exported"
    export._write(store.get("run", "sft"), out, merge=True)
    saved = GenerationConfig.from_pretrained(out)
    assert set(saved.eos_token_id) == set(ids(tokenizer, LLAMA_3["ends"]))
    assert saved.pad_token_id == tokenizer.pad_token_id not in saved.eos_token_id
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.get_input_embeddings().num_embeddings == rows  # the base's vocabulary, no row added
    eom = tokenizer.convert_tokens_to_ids("<|eom_id|>")

    def eom_first(module, args, logits):
        logits = logits.clone()
        logits[..., eom] += 1e4
        return logits

    exported.lm_head.register_forward_hook(eom_first)
    prompt = AutoTokenizer.from_pretrained(out)("sort: b a", return_tensors="pt")
    generated = exported.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated[0, prompt.input_ids.shape[1]:].tolist() == [eom]  # plain generate() stops there too


def test_a_lora_checkpoint_takes_its_ends_from_the_model_it_merges_into(tmp_path):
    """An adapter checkpoint has no generation config of its own: the ends come from its base's."""
    folder, *_ = build(tmp_path / "model", LLAMA_3)
    adapter = tmp_path / "store" / "run" / "sft"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "manifest.json").write_text(json.dumps({"id": "run/sft", "stage": "sft", "base": str(folder)}))
    PreTrainedTokenizerFast.from_pretrained(folder).save_pretrained(adapter)
    assert loading.generation_source(adapter) == folder
    tokenizer = loading.load_tokenizer(adapter, registry.get(str(folder), template="plain"))
    assert set(tokenizer.end_ids) == set(ids(tokenizer, LLAMA_3["ends"]))
