"""`make data-check DATA=...`: read every split a data file names, as the stages would, without training.

    python -m alignment.data_check DATA [model=NAME] [template=NAME] [on_error=raise|skip]

Per split: records read, used, skipped (by problem, with where each problem first occurs), sequences over
the stages' default lengths (what the stage then does with them), the longest one, and the first record
rendered with the model's template. Every problem is one line naming the file, the line or record, and
what is wrong; the exit status is 1 when the data would stop a stage (a file that cannot be read, a bad
record with on_error=raise, a split a stage needs that cannot be made).
"""

from __future__ import annotations

import dataclasses
import sys

from alignment import config, data, registry
from alignment.config import field


@dataclasses.dataclass
class Config:
    data: str = field("task", "a built-in data name or the path of a YAML data file")
    model: str = field("tiny-llama", "the model whose template renders prompts and whose tokenizer counts tokens")
    template: str = field("", "prompt template; empty: the data file's, else the model's")
    on_error: str = field("", "raise or skip; empty: the data file's")
    sft_max_length: int = field(512, "the sft stage's default sft.max_length")
    rm_max_length: int = field(512, "the rm stage's default rm.max_length")
    max_prompt_length: int = field(512, "the ppo stage's default ppo.max_prompt_length")
    show: int = field(300, "characters of the first record shown per field")
    count_tokens: bool = field(True, "count tokens with the model's tokenizer (a tiny twin's is trained first)")


def main(argv: list[str]) -> int:
    # 1. the data file, and the names it gives
    positional = [a for a in argv if "=" not in a and not a.startswith("-")]
    cfg = config.cli(Config, [a for a in argv if a not in positional] + [f"data={a}" for a in positional[:1]])
    profile = data.get_profile(cfg.data)
    on_error = cfg.on_error or profile.on_error
    spec = registry.get(cfg.model, template=cfg.template or profile.template)
    print(f"data-check: {profile.file}   on_error={on_error}   template {spec.template}   model {spec.name}")

    # 2. every split, parsed; problems collected rather than stopping at the first
    loaded = {}
    for split in data.SPLITS:
        try:
            loaded[split] = data.load_split(cfg.data, split, on_error="collect", where=True)
        except data.DataError as e:
            loaded[split] = e

    # 3. a tokenizer to count tokens with: the model's (a tiny twin's is trained on this data's text)
    readable = [got for got in loaded.values() if not isinstance(got, data.DataError) and got.records]
    tokenizer = _tokenizer(spec, cfg.data, profile) if cfg.count_tokens and readable else None

    # 4. the report, split by split; a split made from another (carved, or the prompts of pairs) shares its
    # sources' problems, which are said once
    failed, said = False, {}
    for split, got in loaded.items():
        if isinstance(got, data.DataError):
            needed = split in profile.splits or "needs" not in str(got)
            print(
                f"{split:14s} {'error' if needed else 'absent'}: "
                + (f"as {said[str(got)]}, above" if str(got) in said else str(got))
            )
            said.setdefault(str(got), split)
            failed |= needed
            continue
        skipped = sum(got.skipped.values())
        print(f"{split:14s} {got.read:,} read, {len(got.records):,} used, {skipped:,} skipped   from {got.origin}")
        level = "error" if on_error == "raise" else "skipped"
        for problem, count in got.skipped.most_common():
            line = f"{level}: {got.first[problem]}: {problem}" + (f" (and {count - 1:,} more)" if count > 1 else "")
            print(f"    {line}" if line not in said else f"    {level}: as {said[line]}, above: {problem}")
            said.setdefault(line, split)
            failed |= on_error == "raise"
        if not got.records:
            print("    error: no usable records")
            failed = True
            continue
        if tokenizer is not None:
            _lengths(split, got.records, spec, tokenizer, cfg)
        _show(got.records[0], spec, cfg.show)
    print("data-check: " + ("FAILED: a stage would stop on the errors above" if failed else "ok"))
    return 1 if failed else 0


def _tokenizer(spec, name: str, profile):
    from alignment import loading

    try:
        path = registry.resolve(spec, data.corpus(name, spec.format_prompt), profile.tokenizer_vocab) \
            if spec.is_tiny else registry.resolve(spec)
        return loading.load_tokenizer(path, spec)
    except Exception as e:  # noqa: BLE001 - no tokenizer (no network, a corpus with errors): report what can be reported
        print(f"(no token counts: the tokenizer of {spec.name} could not be loaded: {str(e).splitlines()[0]})")
        return None


def _lengths(split: str, records: list[dict], spec, tokenizer, cfg: Config) -> None:
    """Records over the default lengths, as each stage treats them, and the longest one."""
    kind = data.KIND[split]

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids) + 1  # + EOS

    if kind == "sft":
        sizes = [count(spec.format_prompt(r["prompt"]) + r["completion"]) for r in records]
        limit, name, effect = cfg.sft_max_length, "sft.max_length", "the prompt loses its beginning"
    elif kind == "prefs":
        sizes = [max(count(spec.format_prompt(r["prompt"]) + r[k]) for k in ("chosen", "rejected")) for r in records]
        limit, name, effect = cfg.rm_max_length, "rm.max_length", "the rm stage drops such a pair"
    else:
        sizes = [count(spec.format_prompt(r["prompt"])) - 1 for r in records]
        limit, name, effect = cfg.max_prompt_length, "ppo.max_prompt_length", "the prompt loses its beginning"
    over = [i for i, n in enumerate(sizes) if n > limit]
    longest = max(range(len(sizes)), key=sizes.__getitem__)
    print(
        f"    {len(over):,} longer than {name}={limit} tokens ({effect})"
        + (f"; first: {records[over[0]]['_where']}" if over else "")
    )
    print(f"    longest: {sizes[longest]:,} tokens, {records[longest]['_where']}")


def _show(record: dict, spec, width: int) -> None:
    def clip(text: str) -> str:
        text = text if len(text) <= width else text[:width] + f"... [{len(text):,} characters]"
        return text.replace("\n", "\n      | ")

    print(f"    first record ({record['_where']}), as the model reads it:")
    print(f"      | {clip(spec.format_prompt(record['prompt']))}")
    for key in ("completion", "chosen", "rejected"):
        if key in record:
            print(f"      {key}: {clip(record[key])!s}")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (data.DataError, KeyError, LookupError) as e:
        sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
