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


def test_republish_replaces_and_leaves_no_debris(tmp_path):
    store = Store(tmp_path)
    first = publish(store, "r1", "sft", payload="one")
    second = publish(store, "r1", "sft", payload="two")
    assert first.manifest["uid"] != second.manifest["uid"]
    assert (store.get("r1", "sft").path / "weights.bin").read_text() == "two"
    assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == ["sft"]


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
