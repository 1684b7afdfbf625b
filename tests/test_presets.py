"""Settings sized to the model, and an unregistered model matched to what it is: a folder holding only a
LLaMA-3-8B-shaped config.json and a tokenizer gets a 7B learning rate, a value 100x that warns in one line, an
instruct tokenizer gets its own chat template and a base one its family's, a copy of a registered model its
entry's settings. Nothing here reads weights (there are none)."""

from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer, LlamaConfig

from alignment import config, presets, registry

ROOT = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
                 "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
                 "\n\n{% endif %}")


def llama_8b_folder(folder: Path, chat_template: str = "") -> Path:
    """config.json of LLaMA-3-8B's shape and a (tiny) tokenizer, nothing else."""
    folder.mkdir(parents=True)
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(registry.resolve(registry.get("tiny-llama")))
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    return folder


def test_presets_by_size_and_lora():
    assert presets.for_stage("sft", 1_000_000, lora=False) == {"learning_rate": 2e-3}  # the tiny twins' own
    assert presets.for_stage("sft", 8_000_000_000, lora=False) == {"learning_rate": 2e-5}
    assert presets.for_stage("sft", 70_000_000_000, lora=False) == {"learning_rate": 1e-5}
    assert presets.for_stage("sft", 8_000_000_000, lora=True) == {"learning_rate": 2e-4}  # QLoRA's
    assert presets.for_stage("dpo", 8_000_000_000, lora=True) == {"learning_rate": 5e-6}
    assert presets.for_stage("ppo", 8_000_000_000, lora=False) == {"learning_rate": 1e-6,
                                                                  "activation_checkpointing": True}
    assert presets.for_stage("ppo", 500_000_000, lora=False) == {"learning_rate": 1e-6}
    assert presets.for_stage("rm", 1_000_000, lora=True) == {"learning_rate": 5e-4}


def resolved(stage: str, capsys, *args: str) -> str:
    """What `python -m stages.<stage> --print-config args` prints (config.cli, as the stage's main calls it)."""
    with pytest.raises(SystemExit) as stop:
        config.cli(_config_class(stage), ["--print-config", *args], default_yaml=ROOT / "configs" / f"{stage}.yaml")
    assert stop.value.code == 0
    return capsys.readouterr().out


def body_of(out: str) -> dict:
    """The resolved settings printed after their header line."""
    return yaml.safe_load(out.split("# resolved", 1)[1].split("\n", 1)[1])


def test_a_folder_of_an_8b_config_resolves_to_7b_settings_and_warns_once(tmp_path, tiny_cache, capsys):
    folder = llama_8b_folder(tmp_path / "llama-8b")
    out = resolved("sft", capsys, f"model={folder}")
    header, body = out.split("\n", 1)[0], body_of(out)
    assert body["sft"]["learning_rate"] == 2e-5 and body["model"] == str(folder)
    assert "8.0B parameters, class mid" in header and "configs/sft.yaml" in header
    assert "warning" not in out

    out = resolved("sft", capsys, f"model={folder}", "sft.learning_rate=2e-3")
    warnings = [line for line in out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "sft.learning_rate=0.002 is 100x the preset" in warnings[0], out
    assert body_of(out)["sft"]["learning_rate"] == 2e-3  # the user's value stands

    out = resolved("ppo", capsys, f"model={folder}", "lora.enabled=true")
    ppo = body_of(out)["ppo"]
    assert ppo["learning_rate"] == 1e-5 and ppo["activation_checkpointing"] is True


def test_the_tiny_default_keeps_its_measured_rates_and_a_data_sets_own(tiny_cache):
    for stage, rate in (("sft", 2e-3), ("rm", 5e-4), ("ppo", 1e-4), ("grpo", 1e-4), ("dpo", 2e-4)):
        cfg = config.load(_config_class(stage), ROOT / "configs" / f"{stage}.yaml")
        assert getattr(cfg, stage).learning_rate == rate and cfg.preset.size_class == "tiny"
    cfg = config.load(_config_class("rm"), ROOT / "configs" / "hh-rlhf" / "rm.yaml")
    assert cfg.rm.learning_rate == 2e-4  # its presets.tiny section
    cfg = config.load(_config_class("rm"), ROOT / "configs" / "hh-rlhf" / "rm.yaml", ["model=llama-3-8b-instruct"])
    assert cfg.rm.learning_rate == 1e-5  # not for a model of another size


@pytest.mark.parametrize("section, message", [
    ("  huge:\n    rm:\n      learning_rate: 1.0e-5\n", "presets: expected a mapping from a size class"),
    ("  large:\n    rm:\n      learnin_rate: 1.0e-5\n", "presets.large: unknown"),  # a class this model is not
    ("  tiny: 5\n", "presets.tiny: expected stage settings"),
    ("  tiny:\n    model: gpt2\n", "presets.tiny: expected stage settings"),
])
def test_a_presets_section_is_checked_whatever_the_models_size(tmp_path, tiny_cache, section, message):
    bad = tmp_path / "rm.yaml"
    bad.write_text("presets:\n" + section)
    with pytest.raises(config.ConfigError, match=message):
        config.load(_config_class("rm"), bad)


def _config_class(stage: str):
    import importlib

    return importlib.import_module(f"stages.{stage}").Config


def test_an_instruct_tokenizer_prompts_with_its_template_and_a_base_one_with_its_familys(tmp_path, tiny_cache):
    instruct = llama_8b_folder(tmp_path / "my-instruct", chat_template=CHAT_TEMPLATE)
    base = llama_8b_folder(tmp_path / "my-base")
    spec = registry.get(str(instruct))
    assert spec.template == "auto" and spec.chat_template == CHAT_TEMPLATE
    assert spec.format_prompt("hi").endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert registry.get(str(base)).template == "alpaca"  # the llama family's
    assert registry.get(str(instruct), template="chatml").template == "chatml"  # an explicit template wins


def test_a_copy_of_a_registered_model_takes_its_entrys_settings(tmp_path, tiny_cache):
    folder = llama_8b_folder(tmp_path / "Meta-Llama-3-8B-Instruct")  # as the hub names it
    spec = registry.get(str(folder))
    entry = registry.MODELS["llama-3-8b-instruct"]
    assert (spec.template, spec.dtype, spec.lora_targets) == (entry.template, entry.dtype, entry.lora_targets)
    assert spec.source == str(folder) and spec.name == str(folder)
