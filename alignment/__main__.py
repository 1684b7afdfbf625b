"""Command line of the library.

    python -m alignment store list [--json] [--root DIR]     checkpoints, lineage, headline metrics
    python -m alignment store verify [--root DIR]            manifests, files, hashes, stale parents; exit 1 if any
    python -m alignment eval [key=value ...]                 the evaluation stage (stages/eval.py)
    python -m alignment generate CHECKPOINT "prompt"         one response from a policy checkpoint
    python -m alignment chat CHECKPOINT                      prompts from the terminal, one response each
    python -m alignment export CHECKPOINT OUT [--no-merge]   a standalone folder for plain transformers
    python -m alignment serve-rm CHECKPOINT [--port 8100]    a reward model over HTTP (alignment/serve.py)
    python -m alignment plan [--nproc N] [--accelerate-config FILE] [--gpu-memory GIB] [key=value ...]
                                                             the memory each process holds in every stage, no weights

CHECKPOINT is a folder, or a store id run/stage (--root picks the store).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from alignment import pipeline
from alignment.store import HISTORY, Store


def _headline(metrics: dict) -> str:
    parts = []
    for key in ("eval_loss", "eval_accuracy"):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{key}={metrics[key]:.3f}")
    for mode in ("greedy", "sampled"):
        section = metrics.get(mode, {})
        if "gold" in section:
            parts.append(f"{mode}_gold={section['gold']['sft']:.3f}->{section['gold']['policy']:.3f}")
        if "kl" in section:
            parts.append(f"{mode}_kl={section['kl']:.2f}")
    return " ".join(parts)


def store_list(root: str, as_json: bool) -> None:
    store = Store(root)
    checkpoints = store.list()
    stale = {c.id: store.stale(c) for c in checkpoints}  # reason, or None
    if as_json:
        print(json.dumps([{**c.summary(), "stale": stale[c.id]} for c in checkpoints], indent=2, default=str))
        return
    if not checkpoints:
        print(f"no checkpoints in {root}/")
        return
    for c in checkpoints:
        m = c.manifest
        parents = ", ".join(m.get("parents") or []) or "-"
        mark = f"  STALE: {stale[c.id]}" if stale[c.id] else ""
        print(f"{c.id:32s} {m['model']:16s} {m.get('created', '')[:19]:20s} <- {parents:28s} {_headline(c.metrics)}"
              f"{mark}")
    replaced = sorted(store.root.glob(f"*/{HISTORY}/*"))
    if replaced:  # kept whole, so they take the space of a checkpoint each
        print(f"{len(replaced)} replaced checkpoint(s) kept in {root}/<run>/{HISTORY}/: remove them when done")


def find_checkpoint(checkpoint: str, root: str):
    """A checkpoint given as a folder or a store id run/stage (StoreError if there is none)."""
    from alignment.store import MANIFEST, StoreError, load_checkpoint

    if (Path(checkpoint) / MANIFEST).is_file():
        return load_checkpoint(checkpoint)
    run, slash, stage = checkpoint.partition("/")
    if not slash:
        raise StoreError(f"{checkpoint!r} is neither a checkpoint folder nor a store id run/stage (e.g. {run}/sft)")
    return Store(root).get(run, stage)


def load_policy(checkpoint: str, root: str):
    """A policy checkpoint (folder or store id) -> (model, tokenizer, registry entry)."""
    from transformers import AutoModelForCausalLM

    from alignment import loading, registry

    found = find_checkpoint(checkpoint, root)
    path, manifest = found.path, found.manifest
    if manifest.get("stage") not in pipeline.POLICIES:
        sys.exit(f"{checkpoint} is a {manifest.get('stage')!r} checkpoint, not a policy: generate and chat take "
                 f"one of {', '.join(pipeline.POLICIES)} (e.g. {manifest.get('run', 'RUN')}/ppo)")
    spec = registry.get(manifest["model"], template=manifest.get("template", ""), tokenizer=path)  # as trained
    model = loading.on_device(loading.load_model(path, AutoModelForCausalLM, spec)).eval()
    return model, loading.load_tokenizer(path, spec), spec


def respond(model, tokenizer, spec, prompt: str, args) -> str:
    from alignment import forwards

    _, _, responses = forwards.generate(
        model, tokenizer, [spec.format_prompt(prompt)], args.max_new_tokens, args.temperature, greedy=not args.sample
    )
    return forwards.decode_responses(tokenizer, responses)[0]


def plan_parser(stages: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alignment plan", description=PLAN_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config keys, as the stages take them (model=..., ppo.batch_size=..., lora.enabled=true)")
    parser.add_argument("--nproc", type=int, default=1, help="processes in all (GPUs)")
    parser.add_argument("--accelerate-config", default="", help="the launch file: configs/accelerate/<...>.yaml")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of memory per process (GPU)")
    parser.add_argument("--cpu-memory", type=float, default=0.0, help="GiB of CPU memory per process for what it "
                        "offloads (a machine's memory over its GPUs); 0: not checked")
    parser.add_argument("--configs", default="configs", help="the folder of the stage YAMLs (configs/hh-rlhf for "
                        "DATA=hh-rlhf)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="gpu: precision auto is bf16, a CUDA context is the fixed cost; cpu: fp32, the fixed "
                        "cost measured here")
    parser.add_argument("--stages", default=",".join(stages), help="comma-separated stages to plan")
    parser.add_argument("--table", action="store_true", help="the table of docs/memory-plan.md instead: 1B to 70B "
                        "LLaMA on 1 to 64 GPUs of --gpu-memory, every stage")
    return parser


def plan_command(argv: list[str]) -> None:
    """`make plan`: options and key=value overrides in any order; a user's mistake (a model that is not there, an
    unknown key, a missing launch file) ends in one line saying what to do."""
    from alignment import plan, plan_report
    from alignment.config import ConfigError
    from alignment.registry import RegistryError

    args = plan_parser(plan.STAGES).parse_intermixed_args(argv)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in plan.STAGES]
    try:
        if unknown or not stages:
            raise plan.PlanError(f"--stages: {','.join(unknown) or 'none'} not a stage; the stages are "
                                 f"{','.join(plan.STAGES)}")
        if not (args.nproc >= 1 and args.gpu_memory > 0 and args.cpu_memory >= 0):  # (NaN too)
            raise plan.PlanError("--nproc (NPROC) takes 1 or more processes, --gpu-memory (GPU_MEMORY) GiB over 0, "
                                 "--cpu-memory (CPU_MEMORY) GiB, 0 for not checked")
        if args.cpu_memory and args.device == "cpu":
            raise plan.PlanError("--cpu-memory (CPU_MEMORY) is for what a GPU's process offloads; on --device cpu "
                                 "all of it is CPU memory: give it as --gpu-memory (GPU_MEMORY)")
        if args.table:
            print(plan_report.table(args.configs, args.gpu_memory * plan.GiB, args.overrides,
                                    (args.cpu_memory or math.inf) * plan.GiB))
        else:
            plan_report.main(args.nproc, args.accelerate_config, args.gpu_memory, args.configs, args.device, stages,
                             args.overrides, args.cpu_memory or math.inf)
    except (plan.PlanError, ConfigError, RegistryError) as e:
        sys.exit(f"error: {e}")


PLAN_HELP = ("the memory each process holds in every stage, whether it fits the GPU's, and the first change that "
             "makes it fit (make plan); no weights needed")


def main(argv: list[str]) -> None:
    if argv[:1] == ["eval"]:  # the stage parses its own key=value arguments
        import runpy

        sys.argv = ["stages/eval.py", *argv[1:]]
        runpy.run_path(str(Path(__file__).resolve().parent.parent / "stages" / "eval.py"), run_name="__main__")
        return
    if argv[:1] == ["plan"]:  # options and key=value arguments in any order
        plan_command(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m alignment")
    commands = parser.add_subparsers(dest="command", required=True)
    store = commands.add_parser("store", help="inspect the checkpoint store")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    listing = store_commands.add_parser("list", help="runs, stages, lineage and headline metrics")
    listing.add_argument("--root", default="store", help="store root (default: ./store)")
    listing.add_argument("--json", action="store_true", help="print a JSON list of checkpoint objects")
    verify = store_commands.add_parser("verify", help="check every checkpoint: manifest, files, hashes")
    verify.add_argument("--root", default="store", help="store root (default: ./store)")
    for name, text in (("generate", "one response to a prompt"), ("chat", "read prompts from the terminal")):
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("checkpoint", help="checkpoint folder or store id run/stage")
        if name == "generate":
            cmd.add_argument("prompt")
        cmd.add_argument("--root", default="store", help="store root for a run/stage id")
        cmd.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        cmd.add_argument("--temperature", type=float, default=1.0)
        cmd.add_argument("--max-new-tokens", type=int, default=64)
    commands.add_parser("eval", help="evaluate checkpoints and write the report (key=value arguments)")
    export = commands.add_parser("export", help="a checkpoint as a standalone folder: weights, tokenizer with its "
                                 "chat template, model card; loads with plain transformers")
    export.add_argument("checkpoint", help="checkpoint folder or store id run/stage")
    export.add_argument("out", help="the folder to write (absent or empty)")
    export.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                        help="merge a LoRA adapter into its base (default); --no-merge: the adapter, naming its base")
    export.add_argument("--root", default="store", help="store root for a run/stage id")
    commands.add_parser("plan", help=PLAN_HELP + " (python -m alignment plan --help)")
    serve = commands.add_parser("serve-rm", help="serve a reward model over HTTP: POST /score, GET /health")
    serve.add_argument("checkpoint", help="reward-model checkpoint folder or store id run/rm")
    serve.add_argument("--root", default="store", help="store root for a run/stage id")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    if args.command == "store" and args.store_command == "list":
        store_list(args.root, args.json)
    elif args.command == "store" and args.store_command == "verify":
        problems = Store(args.root).verify()
        for line in problems:
            print(line)
        print(f"{len(Store(args.root).list())} checkpoints in {args.root}/, {len(problems)} problems")
        sys.exit(1 if problems else 0)
    elif args.command == "generate":
        model, tokenizer, spec = load_policy(args.checkpoint, args.root)
        print(respond(model, tokenizer, spec, args.prompt, args))
    elif args.command == "export":
        from alignment.export import ExportError, export
        from alignment.store import StoreError

        try:
            out = export(find_checkpoint(args.checkpoint, args.root), args.out, merge=args.merge)
        except (StoreError, ExportError) as e:
            sys.exit(f"error: {e}")
        print(f"exported {args.checkpoint} -> {out}")
    elif args.command == "serve-rm":
        from alignment import serve
        from alignment.store import StoreError

        try:
            checkpoint = find_checkpoint(args.checkpoint, args.root)
        except StoreError as e:
            sys.exit(f"error: {e}")
        if checkpoint.manifest.get("stage") != "rm":
            sys.exit(f"error: {args.checkpoint} is a '{checkpoint.manifest.get('stage')}' checkpoint, not a reward "
                     "model: serve-rm takes run/rm")
        serve.serve(checkpoint, args.host, args.port)
    elif args.command == "chat":
        model, tokenizer, spec = load_policy(args.checkpoint, args.root)
        print(f"{args.checkpoint} ({spec.name}, template '{spec.template}'). Each line is answered on its own; "
              "an empty line or Ctrl-D ends.")
        for line in sys.stdin:
            if not line.strip():
                break
            print(respond(model, tokenizer, spec, line.strip(), args), flush=True)


if __name__ == "__main__":
    from alignment.registry import RegistryError

    try:
        main(sys.argv[1:])
    except RegistryError as e:  # a policy's model that cannot be resolved here
        sys.exit(f"error: {e}")
    except BrokenPipeError:  # `store list --json | head`: the reader had enough
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)
