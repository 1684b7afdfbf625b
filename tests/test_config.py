import dataclasses
import re

import pytest

from alignment import config
from stages import ppo as ppo_stage
from stages import sft as sft_stage


def test_defaults_yaml_and_overrides_in_order(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("model: tiny-bloom\nppo:\n  steps: 7\n  kl_coef: 0.2\n")
    cfg = config.load(ppo_stage.Config, path, ["ppo.steps=9", "run=exp1"])
    assert cfg.model == "tiny-bloom" and cfg.run_name == "exp1"
    assert cfg.ppo.steps == 9 and cfg.ppo.kl_coef == 0.2
    assert cfg.ppo.batch_size == ppo_stage.PPOSettings().batch_size  # untouched default


def test_int_is_accepted_for_float_and_lists_parse():
    cfg = config.load(sft_stage.Config, None, ["sft.learning_rate=1", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.sft.learning_rate == 1.0 and isinstance(cfg.sft.learning_rate, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("ppo.stepz=3", "unknown config key 'ppo.stepz' (did you mean 'ppo.steps'?)"),
        ("nonsense=1", "unknown config key 'nonsense'"),
        ("ppo.steps=abc", "ppo.steps: expected int, got 'abc'"),
        ("ppo.steps=1.5", "ppo.steps: expected int, got 1.5"),
        ("ppo.adaptive_kl=3", "ppo.adaptive_kl: expected bool, got 3"),
        ("ppo=3", "ppo: is a section"),
        ("justakey", "is not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(config.ConfigError) as e:
        config.load(ppo_stage.Config, None, [override])
    assert message in str(e.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ppo:\n  kl_coeff: 0.1\n")
    with pytest.raises(config.ConfigError, match=r"bad.yaml: unknown config key 'ppo.kl_coeff'"):
        config.load(ppo_stage.Config, path)


def test_cli_exits_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        config.cli(ppo_stage.Config, ["ppo.steps=x"])
    assert "ppo.steps" in str(e.value.code)


def test_shipped_yaml_files_load():
    for stage in ("sft", "rm", "ppo", "dpo"):
        module = __import__(f"stages.{stage}", fromlist=["Config"])
        cfg = config.load(module.Config, f"configs/{stage}.yaml")
        assert dataclasses.is_dataclass(cfg)
        if stage != "ppo":
            config.load(module.Config, f"configs/hh-rlhf/{stage}.yaml")


def test_sections_are_not_shared_between_instances():
    a, b = ppo_stage.Config(), ppo_stage.Config()
    a.ppo.steps = 123
    assert b.ppo.steps != 123


def test_exponent_without_dot_is_a_float():
    cfg = config.load(ppo_stage.Config, None, ["ppo.learning_rate=1e-5"])
    assert cfg.ppo.learning_rate == 1e-5
    with pytest.raises(config.ConfigError, match="ppo.learning_rate: expected float, got 'fast'"):
        config.load(ppo_stage.Config, None, ["ppo.learning_rate=fast"])


@pytest.mark.parametrize("argv, message", [
    (["--config"], "--config needs a YAML file path"),
    (["--config", "ppo.steps=3"], "--config needs a YAML file path"),  # the value forgotten, the next key taken
    (["--conifg", "x.yaml"], "unknown option '--conifg'"),
])
def test_a_flag_without_its_value_or_unknown_is_an_error(argv, message):
    with pytest.raises(SystemExit) as e:
        config.cli(ppo_stage.Config, argv)
    assert message in str(e.value.code) and "usage: python" in str(e.value.code)


def test_help_starts_with_a_usage_line(capsys):
    with pytest.raises(SystemExit):
        config.cli(ppo_stage.Config, ["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python ") and "[--config FILE.yaml] [--print-config] [key=value ...]" in out
    assert "ppo.kl_coef = 0.3" in out


def test_the_line_ctrl_c_ends_with(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "PROGRESS", {"stage": "ppo", "step": 7, "state": lambda: tmp_path})
    assert config.interrupted_line() == (
        f"[ppo] stopped by Ctrl-C after step 7; the last resumable state is {tmp_path}: the same command resumes it"
    )
    monkeypatch.setattr(config, "PROGRESS", {"stage": "sft", "step": None, "state": lambda: None})
    assert "before its first step; no resumable state was saved yet" in config.interrupted_line()


def test_trainer_stage_settings_reach_the_trl_config(tmp_path):
    """The trainer stages (sft, rm, dpo) build their TRL config one way: the shared keys (gradient accumulation,
    clipping) arrive, and so does any other TRL argument through trainer_args; a trainer_args key TRL does not know,
    or one set already, stops the stage at start-up."""
    from trl import SFTConfig

    from alignment import training

    cfg = config.load(sft_stage.Config, None, ["sft.gradient_accumulation_steps=4", "sft.max_grad_norm=0.5",
                                                "sft.trainer_args={adam_beta2: 0.95}"])
    args = training.trainer_config(SFTConfig, "sft", cfg.sft, cfg, tmp_path, completion_only_loss=True)
    assert args.gradient_accumulation_steps == 4 and args.max_grad_norm == 0.5 and args.adam_beta2 == 0.95
    assert args.num_train_epochs == 3.0 and args.learning_rate == 2e-3 and args.lr_scheduler_type == "cosine"
    assert args.activation_checkpointing and args.save_total_limit == 2 and args.output_dir == str(tmp_path)
    for given, message in (("{adam_beta9: 1}", "'adam_beta9' is not an argument of TRL's SFTConfig"),
                           ("{learning_rate: 1}", "'learning_rate' is set already, set sft.learning_rate instead"),
                           ("{completion_only_loss: false}", "'completion_only_loss' is set already, from a key")):
        cfg = config.load(sft_stage.Config, None, [f"sft.trainer_args={given}"])
        with pytest.raises(SystemExit, match=re.escape(f"sft.trainer_args: {message}")):
            training.trainer_config(SFTConfig, "sft", cfg.sft, cfg, tmp_path, completion_only_loss=True)


def test_a_mapping_is_set_key_by_key_and_a_broken_value_is_one_line():
    cfg = config.load(sft_stage.Config, None, ["sft.trainer_args.adam_beta2=0.95", "sft.trainer_args.optim=adafactor"])
    assert cfg.sft.trainer_args == {"adam_beta2": 0.95, "optim": "adafactor"}
    # what `make sft ARGS="sft.trainer_args={adam_beta2: 0.95}"` passes: make's word splitting cuts the value
    with pytest.raises(config.ConfigError, match=r"sft.trainer_args: '\{adam_beta2:' is not a YAML value .*"
                                                 r"sft.trainer_args.<name>=<value>"):
        config.load(sft_stage.Config, None, ["sft.trainer_args={adam_beta2:", "0.95}"])


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "grpo", "rloo", "reinforce", "dpo"])
def test_save_every_below_one_stops_at_start_up_in_every_stage(stage):
    """save_every=0 would divide by zero at the first PPO step, or hand the trainer save_steps=0: one line first."""
    import importlib

    module = importlib.import_module(f"stages.{stage}")
    with pytest.raises(config.ConfigError, match=r"save_every=0: it takes 1 or more"):
        config.load(module.Config, None, ["save_every=0"])
    assert config.load(module.Config, None, ["save_every=1"]).save_every == 1
