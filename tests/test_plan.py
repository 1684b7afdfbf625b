"""The memory plan (alignment/plan.py, `make plan`): parameter counts from the meta device, the formulas against
hand-computed values, whether the big cases fit, the order of the fixes, and a user's mistakes in one line. No
weights, no training: models are built on the meta device (and one tiny one for real, to compare)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from alignment import plan, plan_report, registry
from alignment.__main__ import main as alignment_main
from alignment.plan import GiB, Launch, Setup

ROOT = Path(__file__).resolve().parent.parent
TINY = [s for s in registry.MODELS.values() if s.is_tiny]
REAL = [s for s in registry.MODELS.values() if not s.is_tiny]
# Parameters of each real entry's model as its model card (or the checkpoint's own count) states them.
PUBLISHED = {
    "llama-2-7b": 6_738_415_616, "llama-2-7b-chat": 6_738_415_616, "bloom-560m": 559_214_592,
    "bloomz-560m": 559_214_592, "llama-3-8b-instruct": 8_030_261_248, "mistral-7b-instruct": 7_241_732_096,
    "qwen2-0.5b-instruct": 494_032_768, "pythia-410m": 405_334_016, "opt-350m": 331_196_416, "gpt2": 124_439_808,
    "llama-3.2-1b-instruct": 1_235_814_400, "llama-2-13b": 13_015_864_320, "llama-3-70b-instruct": 70_553_706_496,
}
# A small shape whose numbers are easy to follow by hand.
SHAPE = plan.Shape(lm_parameters=1000, classifier_parameters=900, layers=2, hidden=4, intermediate=8, kv_width=2,
                   vocab=10, gated_mlp=True, largest_block=100, quantized_weights=600,
                   linear_widths=(("q_proj", 16), ("up_proj", 24), ("v_proj", 12)))


def work(stage="sft", **changes) -> plan.Workload:
    defaults = dict(stage=stage, bf16=False, micro_batch=2, rows_per_example=1, width=3, logit_positions=3,
                    activation_checkpointing=False, lora_targets=("q_proj", "v_proj"))
    return plan.Workload(**{**defaults, **changes})


def item(p: plan.Plan, name: str, phase: str = plan.HELD) -> float:
    return sum(i.bytes for i in p.items if i.name == name and i.phase == phase)


@pytest.fixture(scope="module")
def configs():
    """The stages' configs as configs/ gives them (each stage file read once)."""
    return plan.stage_configs(plan.STAGES, ROOT / "configs", [])


@pytest.mark.parametrize("spec", TINY, ids=lambda s: s.name)
def test_the_meta_count_equals_the_same_model_built(spec):
    config = CONFIG_MAPPING[spec.family](vocab_size=64, **dict(spec.tiny_config))
    shape = plan.shape_of(config)
    lm = AutoModelForCausalLM.from_config(config)
    config.num_labels = 1
    classifier = AutoModelForSequenceClassification.from_config(config)
    assert shape.lm_parameters == sum(p.numel() for p in lm.parameters())
    assert shape.classifier_parameters == sum(p.numel() for p in classifier.parameters())
    linear = [m for m in lm.modules() if type(m).__name__ in ("Linear", "Conv1D") and m is not lm.lm_head]
    assert shape.quantized_weights == sum(m.weight.numel() for m in linear)


@pytest.mark.parametrize("spec", REAL, ids=lambda s: s.name)
def test_every_real_entry_carries_the_shape_of_its_published_model(spec):
    assert spec.architecture, f"{spec.name}: no architecture numbers, so make plan cannot count it offline"
    assert plan.model(spec.name).shape.lm_parameters == PUBLISHED[spec.name]


def test_the_trained_states_per_parameter_and_what_zero_divides():
    p = 1000
    assert plan.trained_states(p, Launch(1), bf16=True) == (4000, 4000, 8000)  # fp32 under autocast
    assert plan.trained_states(p, Launch(2), bf16=True) == (4000, 4000, 8000)  # DDP: whole in each
    assert plan.trained_states(p, Launch(1, zero=3), bf16=True) == (2000, 2000, 12000)  # 2 + 2 + 4 + 8
    assert plan.trained_states(p, Launch(2, zero=1), bf16=True) == (2000, 2000, 6000)
    assert plan.trained_states(p, Launch(2, zero=2), bf16=True) == (2000, 1000, 6000)
    assert plan.trained_states(p, Launch(2, zero=3), bf16=True) == (1000, 1000, 6000)
    assert plan.trained_states(p, Launch(2, zero=2), bf16=False) == (4000, 2000, 6000)  # fp32: master cloned
    assert plan.trained_states(p, Launch(2, zero=3), bf16=False) == (2000, 2000, 4000)  # fp32: no master apart


def test_zero3_with_two_processes_halves_the_partitioned_model_states():
    one = plan.for_stage("ppo", SHAPE, Launch(1, zero=3), work("ppo", rollout_rows=2, prompt_tokens=2, new_tokens=1))
    two = plan.for_stage("ppo", SHAPE, Launch(2, zero=3), one.work)
    for name in ("trained weights", "gradients", "optimizer states", "reference", "reward model"):
        assert item(two, name) == pytest.approx(item(one, name) / 2) and item(one, name) > 0, name
    # by hand, fp32: policy 1000 + critic 900 trained, 4 + 4 + 8 bytes, halved; the reference 1000 x 4 halved
    assert item(two, "trained weights") == 1900 * 4 / 2 and item(two, "optimizer states") == 1900 * 8 / 2
    assert item(two, "reference") == 1000 * 4 / 2
    # generation gathers the whole policy (not the critic) in each process whatever their number
    assert item(two, "gathered policy", plan.ROLLOUT) == item(one, "gathered policy", plan.ROLLOUT) == 1000 * 4
    # DeepSpeed's ZeRO-3 step flattens the gradient partition into a new fp32 buffer while it runs, one sub-group at a
    # time: the RL loop's are 24 h^2 = 384 elements here (distributed.zero3_sizes), and one may pass that by up to a
    # parameter's partition (at most the largest block's, 100 / 2); ZeRO-2 keeps none
    assert item(two, "gradients flattened for the step", plan.STEP) == min(1900 / 2, 24 * 4 * 4 + 100 / 2) * 4
    wide = dataclasses.replace(SHAPE, hidden=64)  # a sub-group larger than the partition: the partition whole
    assert item(plan.for_stage("ppo", wide, Launch(2, zero=3), one.work), "gradients flattened for the step",
                plan.STEP) == 1900 * 4 / 2
    zero2 = plan.for_stage("ppo", SHAPE, Launch(2, zero=2), one.work)
    assert not any(i.phase == plan.STEP for i in zero2.items)


def test_lora_and_4bit_reduce_the_trained_states_as_by_hand():
    assert plan.lora_parameters(SHAPE, ("q_proj", "v_proj"), r=2) == 2 * (16 + 12)
    lora = plan.for_stage("sft", SHAPE, Launch(1), work(lora=True, lora_r=2))
    assert item(lora, "trained weights") == 4 * 56  # the adapters, fp32
    assert item(lora, "optimizer states") == 8 * 56
    assert item(lora, "policy's frozen base") == 4 * 1000  # the base as loaded to train: fp32
    four_bit = plan.for_stage("sft", SHAPE, Launch(1), work(lora=True, lora_r=2, quantization="4bit",
                                                             compute_dtype="bfloat16"))
    assert item(four_bit, "trained weights") == 4 * 56
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits, an 8-bit absmax per 64, an fp32 constant per 256 of those
    assert item(four_bit, "policy's frozen base") == pytest.approx(600 * nf4 + 400 * 2)
    full = plan.for_stage("sft", SHAPE, Launch(1), work())
    assert item(full, "trained weights") == 4 * 1000 and item(full, "optimizer states") == 8 * 1000


def test_the_memory_of_a_forward_by_hand():
    assert plan.kv_cache_bytes(rows=2, tokens=3, shape=SHAPE, dtype_bytes=2) == 2 * 2 * 2 * 3 * 2 * 2
    # a token in a layer: bf16 matmul inputs 4h + 2kv + 4I = 16 + 4 + 32, norms 2h x (2 + 4) = 48
    assert plan.layer_activation_bytes(SHAPE, compute_bytes=2, residual_bytes=2) == 2 * 52 + 48
    full = plan.activation_bytes(rows=2, tokens=3, shape=SHAPE, compute_bytes=2, residual_bytes=2,
                                 checkpointing=False)
    assert full == 2 * 3 * 2 * 152
    checkpointed = plan.activation_bytes(2, 3, SHAPE, 2, 2, checkpointing=True)
    assert checkpointed == 2 * 3 * (2 * 4 * 2 + 152)  # every layer's input, one layer recomputed
    # the RL loop: logits of 20 rows, the fp32 log-softmax kept for each, 8 rows' fp32 temporaries at a time
    assert plan.logits_bytes(20, 3, 10, 2, chunked=True) == 20 * 30 * (2 + 4) + 8 * 30 * 12
    assert plan.logits_bytes(20, 3, 10, 2, chunked=False) == 20 * 30 * (2 + 8)


def test_a_folder_and_a_hub_id_in_the_local_cache_are_planned_from_their_config(tmp_path, monkeypatch):
    from huggingface_hub import constants

    config = CONFIG_MAPPING["qwen2"](vocab_size=96, **dict(registry.get("tiny-qwen2").tiny_config))
    config.save_pretrained(tmp_path / "folder")
    built = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert plan.model(str(tmp_path / "folder")).shape.lm_parameters == built
    cache = tmp_path / "hub"  # the hub cache's layout of a download: models--org--name/snapshots/<rev>, refs/main
    snapshot = cache / "models--someorg--plan-qwen2" / "snapshots" / ("0" * 40)
    config.save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    hub = plan.model("someorg/plan-qwen2")  # HF_HUB_OFFLINE=1 (conftest): from the cache or not at all
    assert hub.shape.lm_parameters == built and hub.dtype == registry.get("qwen2-0.5b-instruct").dtype


def test_the_launch_files():
    accelerate = ROOT / "configs" / "accelerate"
    assert plan.launch_from(accelerate / "zero3_offload.yaml", 8) == Launch(8, 3, True, True)
    assert plan.launch_from(accelerate / "zero2.yaml", 4) == Launch(4, 2)
    assert plan.launch_from(accelerate / "ddp.yaml", 8) == plan.launch_from("", 8) == Launch(8)


def test_overrides_go_to_the_stages_that_have_the_key(configs):
    cfgs = plan.stage_configs(("sft", "ppo"), ROOT / "configs", ["ppo.mini_batch_size=4", "lora.enabled=true"])
    assert cfgs["ppo"].ppo.mini_batch_size == 4 and cfgs["sft"].lora.enabled and cfgs["ppo"].lora.enabled
    with pytest.raises(plan.ConfigError, match="did you mean 'ppo.mini_batch_size'"):
        plan.stage_configs(("ppo",), ROOT / "configs", ["ppo.mini_batchsize=4"])


def eight_b(stage, configs, processes, launch="zero3.yaml", overrides=()):
    """(shape, setup) of the 8B LLaMA in stage as configs/ has it (with overrides), under a launch file."""
    m = plan.model("llama-3-8b-instruct")
    cfg = plan.stage_configs((stage,), ROOT / "configs", list(overrides))[stage] if overrides else configs[stage]
    return m.shape, Setup(plan.launch_from(ROOT / "configs" / "accelerate" / launch, processes),
                          plan.workload(stage, cfg, m))


def test_8b_ppo_on_8_gpus_under_zero3_fits_with_full_parameters(configs):
    shape, setup = eight_b("ppo", configs, 8)
    found = plan.first_fit("ppo", shape, setup, 80 * GiB, plan.CUDA_CONTEXT)
    assert found.fits and found.setup.launch.zero == 3 and not found.setup.work.lora
    assert not found.setup.work.quantization and found.plan.peak + plan.CUDA_CONTEXT <= 80 * GiB
    # with the micro batch it names, the configuration fits as it is
    shape, named = eight_b("ppo", configs, 8, overrides=[f"ppo.mini_batch_size={found.setup.work.micro_batch}"])
    assert plan.first_fit("ppo", shape, named, 80 * GiB, plan.CUDA_CONTEXT).change == ""


def test_70b_ppo_on_8_gpus_does_not_fit_because_of_the_gathered_policy(configs):
    m = plan.model("llama-3-70b-instruct")
    setup = Setup(Launch(8, zero=3), plan.workload("ppo", configs["ppo"], m))
    found = plan.first_fit("ppo", m.shape, setup, 80 * GiB, plan.CUDA_CONTEXT)
    assert not found.fits
    zero3 = found.why_not[0]
    assert "gathered policy alone" in zero3.text and "ZeRO-3" in zero3.route
    gathered = 2 * m.shape.lm_parameters / GiB  # bf16, whole
    assert f"{gathered:.1f} GiB" in zero3.text and gathered > 80


def test_the_first_fix_is_the_first_of_the_ordered_list(configs):
    shape, setup = eight_b("sft", configs, 8, launch="ddp.yaml")
    found = plan.first_fit("sft", shape, setup, 80 * GiB, plan.CUDA_CONTEXT)
    assert found.change == "ZeRO-3" and found.setup.launch.zero == 3
    lora_alone = plan.for_stage("sft", shape, setup.launch, dataclasses.replace(setup.work, lora=True))
    assert plan.fits(lora_alone, 80 * GiB, plan.CUDA_CONTEXT)  # LoRA would do too: it comes later
    shape, setup = eight_b("ppo", configs, 8)  # ZeRO-3 given: offload, LoRA and 4-bit do not do it
    found = plan.first_fit("ppo", shape, setup, 80 * GiB, plan.CUDA_CONTEXT)
    assert found.change == "smaller micro batch"
    bigger = dataclasses.replace(found.setup.work, micro_batch=found.setup.work.micro_batch * 2)
    assert not plan.fits(plan.for_stage("ppo", shape, setup.launch, bigger), 80 * GiB, plan.CUDA_CONTEXT)
    checkpointed = dataclasses.replace(setup.work, activation_checkpointing=True)
    assert plan.fits(plan.for_stage("ppo", shape, setup.launch, checkpointed), 80 * GiB, plan.CUDA_CONTEXT)


def test_what_is_offloaded_must_fit_the_cpu_memory_given(configs):
    """8B SFT on one GPU with everything offloaded: the device holds little, CPU memory the most (the optimizer
    states, 16 bytes a parameter in fp32). Unchecked it fits; with less CPU memory than that, the plan says it does
    not, and its first fix offloads only the optimizer (the parameters back on the GPU)."""
    shape, setup = eight_b("sft", configs, 1, launch="zero3_offload.yaml")
    given = plan.plan_of("sft", shape, setup)
    host = given.host
    assert host > 16 * shape.lm_parameters and given.peak + plan.CUDA_CONTEXT < 40 * GiB
    assert plan.first_fit("sft", shape, setup, 139 * GiB, plan.CUDA_CONTEXT).change == ""  # unchecked
    assert plan.first_fit("sft", shape, setup, 139 * GiB, plan.CUDA_CONTEXT, host_budget=host).change == ""
    assert host > 120 * GiB
    found = plan.first_fit("sft", shape, setup, 139 * GiB, plan.CUDA_CONTEXT, host_budget=120 * GiB)
    assert found.fits and found.change == "offload"
    assert found.setup.launch.offload_optimizer and not found.setup.launch.offload_parameters
    assert found.plan.host <= 120 * GiB and found.plan.peak > given.peak  # the parameters came back to the GPU
    text = plan_report.report("sft", shape, setup, 139 * GiB, plan.CUDA_CONTEXT, 120 * GiB)
    assert f"does not fit; CPU memory {host / GiB:.1f} of 120 GiB a process (offloaded): more than there is" in text
    assert "first fix (offload)" in text
    # where no route fits the CPU memory, the offloading route says so
    nothing = plan.first_fit("sft", shape, setup, 5 * GiB, plan.CUDA_CONTEXT, host_budget=GiB)  # 4-bit: 5.3 GiB
    assert not nothing.fits and any("of CPU memory a process offloaded, over the 1 GiB there are" in b.text
                                    for b in nothing.why_not)
    # too much for the device and for the CPU memory: both said
    both = plan.first_fit("sft", shape, setup, 2 * GiB, plan.CUDA_CONTEXT, host_budget=GiB).why_not[0]
    assert "GiB at the peak" in both.text and "over the 1 GiB there are" in both.text
    # the table's search takes the CPU memory too: 8B SFT on 1 GPU of 40 GiB, offloading, with 20 GiB a process
    loose = plan.lightest_fit("sft", shape, setup, 40 * GiB, plan.CUDA_CONTEXT)
    tight = plan.lightest_fit("sft", shape, setup, 40 * GiB, plan.CUDA_CONTEXT, host_budget=20 * GiB)
    assert loose.plan.host > 20 * GiB >= tight.plan.host


def test_4bit_is_never_planned_under_zero3(configs):
    m = plan.model("llama-3-8b-instruct")
    setup = Setup(Launch(8, zero=3), plan.workload("grpo", configs["grpo"], m))
    (four_bit,) = plan._four_bit(setup)
    assert four_bit.launch.zero == 2 and four_bit.work.lora and four_bit.work.quantization == "4bit"
    refused = dataclasses.replace(four_bit, launch=setup.launch)
    assert not plan.fits(plan.plan_of("grpo", m.shape, refused), float("inf"), 0)


def test_the_85m_ppo_of_the_memory_bench_within_20_percent_of_its_measurement(tmp_path):
    """bench/README.md: PPO on the 85.5M LLaMA, 1 process, fp32, measured 3,696 MB at the peak less the fixed cost
    of a process, 424 MB. Prompts of the embedded task are at most 19 tokens with its tokenizer."""
    config = CONFIG_MAPPING["llama"](vocab_size=340, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                     num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                                     tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    m = plan.model(str(tmp_path))
    assert m.shape.lm_parameters == 85_476_096 and m.dtype == "bfloat16"  # the llama family's frozen dtype
    cfg = plan.stage_configs(("ppo",), ROOT / "configs", [
        "precision=fp32", "ppo.batch_size=8", "ppo.mini_batch_size=8", "ppo.max_new_tokens=8",
        "ppo.max_prompt_length=19"])["ppo"]
    planned = plan.for_stage("ppo", m.shape, Launch(1, device="cpu"), plan.workload("ppo", cfg, m, "cpu")).peak
    measured = (3696 - 424) * 2**20
    assert abs(planned - measured) / measured < 0.2


def test_a_users_mistake_is_one_line(tmp_path):
    for args, expected in ((["model=llama-9000"], "error: unknown model 'llama-9000'"),
                           ([f"model={tmp_path}"], "has no config.json"),
                           (["ppo.mini_batchsize=2"], "did you mean 'ppo.mini_batch_size'"),
                           (["--accelerate-config", "configs/accelerate/zero4.yaml"], "zero3.yaml"),
                           (["--stages", "ppo,sfr"], "sfr"),
                           (["--cpu-memory", "-1"], "--cpu-memory (CPU_MEMORY) GiB, 0 for not checked"),
                           (["--cpu-memory", "nan"], "--cpu-memory (CPU_MEMORY) GiB, 0 for not checked"),
                           (["--cpu-memory", "64", "--device", "cpu"], "give it as --gpu-memory (GPU_MEMORY)")):
        with pytest.raises(SystemExit) as stopped:
            alignment_main(["plan", "--stages", "ppo", *args])
        message = str(stopped.value.code)
        assert message.startswith("error: ") and expected in message and "\n" not in message, message


def test_the_command_says_it_in_one_line_without_a_traceback():
    out = subprocess.run([sys.executable, "-m", "alignment", "plan", "model=llama-9000", "--stages", "rm",
                          "lora.enabled=true"], cwd=ROOT, capture_output=True, text=True)  # options among keys
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "a local model folder, or a hub id" in out.stderr


def test_make_plan_needs_no_deepspeed_and_trains_nothing():
    out = subprocess.run(["make", "-n", "plan", "NPROC=8", "ACCELERATE_CONFIG=configs/accelerate/zero3.yaml",
                          "MODEL=llama-3-8b-instruct", "GPU_MEMORY=40"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "-m alignment plan --nproc 8 --accelerate-config configs/accelerate/zero3.yaml" in out.stdout
    assert "--gpu-memory 40" in out.stdout and "model=llama-3-8b-instruct" in out.stdout
    assert "--cpu-memory" not in out.stdout  # unchecked unless CPU_MEMORY is given
    assert "deepspeed" not in out.stdout and "stages." not in out.stdout


def test_the_report_names_the_fix_and_what_it_changes(configs):
    shape, setup = eight_b("ppo", configs, 8)
    text = plan_report.report("ppo", shape, setup, 80 * GiB, plan.CUDA_CONTEXT)
    assert "does not fit" in text and "first fix (smaller micro batch): ppo.mini_batch_size=" in text
    assert "gathered policy" in text and "KV cache" in text and "activations" in text


def test_zero3_gathers_the_largest_block_a_70b_has_its_embedding():
    shape = plan.model("llama-3-70b-instruct").shape
    layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192  # attention, MLP, two norms
    assert shape.largest_block == 128256 * 8192 > layer
    assert shape.kv_width == 8 * 128 and shape.gated_mlp and shape.intermediate == 28672


def test_the_figure_for_a_manifest_is_none_and_one_line_where_the_model_cannot_be_planned(configs, capsys):
    cfg = configs["ppo"]
    assert plan.planned_peak_mb("ppo", cfg, Launch(2, zero=3, device="cpu")) > 0
    unknown = dataclasses.replace(cfg, model="no-such-model")
    assert plan.planned_peak_mb("ppo", unknown, Launch(2, zero=3, device="cpu")) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[ppo] no memory plan for the manifest: ") and "no-such-model" in out[0]
