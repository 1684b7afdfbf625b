import json
import subprocess
import sys

import pytest

from alignment.store import Store, StoreError


def publish(store, run, stage, parents=(), metrics=None, payload="w"):
    tmp = store.staging(run, stage)
    (tmp / "weights.bin").write_text(payload)
    return store.publish(tmp, {"run": run, "stage": stage, "model": "tiny-llama", "parents": list(parents),
                               "metrics": metrics or {}})


def test_checkpoint_is_invisible_until_published(tmp_path):
    store = Store(tmp_path)
    tmp = store.staging("r1", "sft")
    (tmp / "weights.bin").write_text("half written")
    assert store.list() == []
    with pytest.raises(StoreError, match="no complete 'sft' checkpoint for run 'r1'"):
        store.get("r1", "sft")
    store.publish(tmp, {"run": "r1", "stage": "sft", "model": "tiny-llama", "parents": [], "metrics": {}})
    ckpt = store.get("r1", "sft")
    assert ckpt.manifest["status"] == "complete" and ckpt.id == "r1/sft"
    assert (ckpt.path / "weights.bin").read_text() == "half written"
    assert not tmp.exists()


def build(store, run, stage, *parents, payload="w"):
    """A checkpoint recording its parents' ids and uids, as the stages publish them."""
    tmp = store.staging(run, stage)
    (tmp / "model.safetensors").write_text(payload)
    return store.publish(tmp, {"run": run, "stage": stage, "model": "tiny-llama", "parents": [p.id for p in parents],
                               "parent_uids": [p.manifest["uid"] for p in parents], "metrics": {}})


def test_republish_replaces_and_keeps_the_old_checkpoint_in_history(tmp_path):
    store = Store(tmp_path)
    first = publish(store, "r1", "sft", payload="one")
    second = publish(store, "r1", "sft", payload="two")
    assert first.manifest["uid"] != second.manifest["uid"]
    assert (store.get("r1", "sft").path / "weights.bin").read_text() == "two"
    assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == [".history", "sft"]  # no debris
    kept = tmp_path / "r1" / ".history" / f"sft-{first.manifest['uid']}"
    assert (kept / "weights.bin").read_text() == "one"
    assert json.loads((kept / "manifest.json").read_text()) == first.manifest  # whole, manifest included
    assert [c.id for c in store.list()] == ["r1/sft"] and store.verify() == []  # hidden, like .state


def test_resumable_state_is_replaced_without_history(tmp_path):
    store = Store(tmp_path)
    for step in ("1", "2"):
        store.save_state("r1", "ppo", lambda folder, step=step: (folder / "step").write_text(step))
    assert (store.load_state_path("r1", "ppo") / "step").read_text() == "2"
    assert [p.name for p in (tmp_path / "r1").iterdir()] == [".state"]
    assert [p.name for p in (tmp_path / "r1" / ".state").iterdir()] == ["ppo"]


def test_lineage_and_listing(tmp_path):
    store = Store(tmp_path)
    publish(store, "r1", "sft")
    publish(store, "r1", "rm", parents=["r1/sft"], metrics={"eval_accuracy": 0.8})
    publish(store, "r1", "ppo", parents=["r1/sft", "r1/rm"])
    listed = {c.id: c for c in store.list()}
    assert set(listed) == {"r1/sft", "r1/rm", "r1/ppo"}
    assert listed["r1/ppo"].manifest["parents"] == ["r1/sft", "r1/rm"]
    assert listed["r1/rm"].metrics["eval_accuracy"] == 0.8


def test_cli_json_listing(tmp_path):
    store = Store(tmp_path)
    publish(store, "r1", "sft")
    publish(store, "r1", "rm", parents=["r1/sft"], metrics={"eval_accuracy": 0.75})
    out = subprocess.run([sys.executable, "-m", "alignment", "store", "list", "--root", str(tmp_path), "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    assert [r["id"] for r in rows] == ["r1/sft", "r1/rm"]
    for row in rows:
        assert {"id", "run", "stage", "model", "parents", "path", "metrics"} <= set(row)
    assert rows[1]["parents"] == ["r1/sft"] and rows[1]["metrics"]["eval_accuracy"] == 0.75
    text = subprocess.run([sys.executable, "-m", "alignment", "store", "list", "--root", str(tmp_path)],
                          capture_output=True, text=True, check=True).stdout
    assert "r1/rm" in text and "eval_accuracy=0.750" in text


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", ".hidden", "", "x..y"])
def test_run_names_that_leave_the_store_are_refused(tmp_path, name):
    with pytest.raises(StoreError, match="invalid run name"):
        Store(tmp_path).staging(name, "sft")


def verify_cli(root):
    return subprocess.run([sys.executable, "-m", "alignment", "store", "verify", "--root", str(root)],
                          capture_output=True, text=True)


def test_verify_finds_missing_corrupt_and_unparsable(tmp_path):
    store = Store(tmp_path)
    for stage in ("sft", "rm", "ppo"):
        tmp = store.staging("r1", stage)
        (tmp / "model.safetensors").write_bytes(b"weights " + stage.encode())
        store.publish(tmp, {"run": "r1", "stage": stage, "model": "m", "parents": [], "metrics": {}})
    assert store.verify() == [] and verify_cli(tmp_path).returncode == 0
    (tmp_path / "r1" / "sft" / "model.safetensors").write_bytes(b"bit rot")
    (tmp_path / "r1" / "rm" / "model.safetensors").unlink()
    (tmp_path / "r1" / "ppo" / "manifest.json").write_text('{"run": ')
    problems = store.verify()
    assert "r1/sft: model.safetensors does not match its recorded sha256" in problems
    assert "r1/rm: model.safetensors is missing" in problems
    assert any(p.startswith("r1/ppo: manifest.json does not parse") for p in problems)
    out = verify_cli(tmp_path)
    assert out.returncode == 1 and "3 problems" in out.stdout


def test_a_crash_during_publish_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import os

    store = Store(tmp_path)
    tmp = store.staging("r1", "sft")
    (tmp / "model.safetensors").write_bytes(b"good")
    store.publish(tmp, {"run": "r1", "stage": "sft", "model": "m", "parents": [], "metrics": {}})

    # crash after the old checkpoint was moved aside, before the new one is renamed in
    real_rename, calls = os.rename, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)

    tmp = store.staging("r1", "sft")
    (tmp / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr("alignment.store.os.rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        store.publish(tmp, {"run": "r1", "stage": "sft", "model": "m", "parents": [], "metrics": {}})
    monkeypatch.undo()
    assert not (tmp_path / "r1" / "sft").exists()  # the window the crash hit
    assert (store.get("r1", "sft").path / "model.safetensors").read_bytes() == b"good"  # put back on access
    assert store.verify() == []


@pytest.mark.parametrize("crash_at, expected, kept", [
    (1, b"good", False),  # moving the old checkpoint aside
    (2, b"good", False),  # renaming the new one in: the old is put back
    (3, b"new", True),  # moving the old one into history: the new one is in place, the old is retired on access
])
def test_a_crash_at_any_rename_of_a_republish_loses_no_checkpoint(tmp_path, monkeypatch, crash_at, expected, kept):
    import os

    store = Store(tmp_path)
    first = build(store, "r1", "sft", payload="good")
    real_rename, calls = os.rename, []

    def crash(src, dst):
        calls.append(dst)
        if len(calls) == crash_at:
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)

    monkeypatch.setattr("alignment.store.os.rename", crash)
    with pytest.raises(KeyboardInterrupt):
        build(store, "r1", "sft", payload="new")
    monkeypatch.undo()
    assert [c.id for c in store.list()] == ["r1/sft"]  # list() recovers as get() does
    assert (store.get("r1", "sft").path / "model.safetensors").read_bytes() == expected
    history = tmp_path / "r1" / ".history" / f"sft-{first.manifest['uid']}"
    assert (history / "model.safetensors").is_file() == kept
    assert not list((tmp_path / "r1").glob(".old-*")) and store.verify() == []


def test_stale_when_a_parent_is_replaced_or_missing(tmp_path):
    store = Store(tmp_path)
    sft = build(store, "r1", "sft")
    rm = build(store, "r1", "rm", sft)
    ppo = build(store, "r1", "ppo", sft, rm)
    assert [store.stale(c) for c in (sft, rm, ppo)] == [None, None, None]

    new_sft = build(store, "r1", "sft", payload="retrained")
    reason = f"parent r1/sft was replaced (uid {sft.manifest['uid']} -> {new_sft.manifest['uid']})"
    assert store.stale(rm) == reason and store.stale(ppo) == reason and store.stale(new_sft) is None
    new_rm = build(store, "r1", "rm", new_sft)
    assert store.stale(new_rm) is None
    assert store.stale(ppo).startswith("parent r1/sft was replaced")  # and its rm too: the first reason is given

    import shutil

    shutil.rmtree(tmp_path / "r1" / "sft")
    assert store.stale(new_rm) == "parent r1/sft is missing"


def test_stale_is_transitive(tmp_path):
    # a policy scored by another run's reward model: that run's SFT retrained makes both stale
    store = Store(tmp_path)
    sft, other_sft = build(store, "r1", "sft"), build(store, "r2", "sft")
    other_rm = build(store, "r2", "rm", other_sft)
    ppo = build(store, "r1", "ppo", sft, other_rm)
    assert store.stale(ppo) is None
    retrained = build(store, "r2", "sft", payload="retrained")
    assert store.stale(ppo) == (f"parent r2/rm is stale: parent r2/sft was replaced "
                                f"(uid {other_sft.manifest['uid']} -> {retrained.manifest['uid']})")


def test_manifests_without_parent_uids_are_never_stale(tmp_path):
    store = Store(tmp_path)
    publish(store, "r1", "sft")
    rm = publish(store, "r1", "rm", parents=["r1/sft"])  # written before parent_uids was recorded
    publish(store, "r1", "sft", payload="retrained")
    assert store.stale(rm) is None
    import shutil

    shutil.rmtree(tmp_path / "r1" / "sft")
    assert store.stale(rm) is None and store.verify() == []


def test_require_fresh_refuses_a_stale_input_unless_allowed(tmp_path, capsys):
    store = Store(tmp_path)
    rm = build(store, "r1", "rm", build(store, "r1", "sft"))
    sft = build(store, "r1", "sft", payload="retrained")
    store.require_fresh(sft)
    with pytest.raises(StoreError) as refused:
        store.require_fresh(sft, rm)
    message = str(refused.value)
    assert message.startswith("r1/rm is stale: parent r1/sft was replaced (uid ")
    assert "run `make rm` again" in message and "allow_stale=true" in message and "\n" not in message
    store.require_fresh(sft, rm, allow_stale=True)
    assert "warning: r1/rm is stale (parent r1/sft was replaced" in capsys.readouterr().out


def list_cli(root, *args):
    return subprocess.run([sys.executable, "-m", "alignment", "store", "list", "--root", str(root), *args],
                          capture_output=True, text=True, check=True).stdout


def test_list_and_verify_report_stale_checkpoints(tmp_path):
    store = Store(tmp_path)
    rm = build(store, "r1", "rm", build(store, "r1", "sft"))
    assert "STALE" not in list_cli(tmp_path) and verify_cli(tmp_path).returncode == 0
    build(store, "r1", "sft", payload="retrained")

    text = list_cli(tmp_path)
    line = next(row for row in text.splitlines() if row.startswith("r1/rm"))
    assert "STALE: parent r1/sft was replaced (uid " in line
    assert "1 replaced checkpoint(s) kept in" in text  # the user is told where the space goes
    rows = {row["id"]: row for row in json.loads(list_cli(tmp_path, "--json"))}
    assert rows["r1/sft"]["stale"] is None and rows["r1/rm"]["stale"].startswith("parent r1/sft was replaced")

    out = verify_cli(tmp_path)
    assert out.returncode == 1 and "2 checkpoints" in out.stdout and "1 problems" in out.stdout
    assert f"r1/rm: stale: {store.stale(rm)}" in out.stdout.splitlines()
