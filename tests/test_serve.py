"""The reward server (alignment/serve.py) on 127.0.0.1 with a real HTTP client: its scores are the in-process
scores of the same texts, bad requests get a 4xx with a message, a client killed mid-request does not stop it, a
dead server stops a stage in one line, and PPO through it trains as PPO scored in-process from the text does."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from transformers import AutoModelForSequenceClassification

from alignment import loading, registry, rewards, scoring
from alignment.config import ConfigError
from alignment.serve import ServerReward
from alignment.store import Store
from stages import ppo as ppo_stage
from stages import rm as rm_stage
from stages import sft as sft_stage

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["limit=32", "threads=2"]
PROMPTS = ["sort: d a c b", [{"role": "user", "content": "copy: a b"}], "reverse: a b c"]
RESPONSES = ["a b c d", "a b hope this helps", ""]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_cache):
    """A store with SFT and RM checkpoints, and its reward model served by `python -m alignment serve-rm`."""
    root = tmp_path_factory.mktemp("serve") / "store"
    sft_stage.main([f"store={root}", *COMMON, "sft.epochs=1", "sft.batch_size=16"])
    rm_stage.main([f"store={root}", *COMMON, "rm.epochs=1", "rm.batch_size=16"])
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "alignment", "serve-rm", "tiny-llama/rm", "--root", str(root),
                               "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"the server did not start: {server.communicate()[0][-2000:]}")
    yield root, url
    server.kill()
    server.wait()


def in_process(root: Path, prompts: list, responses: list[str]) -> list[float]:
    rm = Store(root).get("tiny-llama", "rm")
    spec = registry.get(rm.manifest["model"], template=rm.manifest["template"], tokenizer=rm.path)
    tokenizer = loading.load_tokenizer(rm.path, spec)
    model = loading.load_model(rm.path, AutoModelForSequenceClassification, spec, tokenizer=tokenizer).eval()
    return scoring.score_texts(model, tokenizer, [spec.format_prompt(p) + r for p, r in zip(prompts, responses)])[0]


def test_scores_are_the_in_process_scores_of_the_same_text(served):
    root, url = served
    health = httpx.get(f"{url}/health").json()
    assert health == {"status": "ok", "checkpoint": "tiny-llama/rm", "model": "tiny-llama"}
    scores = httpx.post(f"{url}/score", json={"prompts": PROMPTS, "responses": RESPONSES}).json()["scores"]
    assert scores == pytest.approx(in_process(root, PROMPTS, RESPONSES), abs=1e-5)
    assert ServerReward(url)(prompts=PROMPTS, completions=RESPONSES) == pytest.approx(scores, abs=1e-6)


@pytest.mark.parametrize("body, status, message", [
    (b"not json", 400, "the body is not JSON"),
    ({"prompts": ["a"]}, 400, 'expected a JSON object {"prompts"'),
    ({"prompts": ["a", "b"], "responses": ["x"]}, 400, "2 prompts for 1 responses"),
    ({"prompts": ["a"], "responses": [3]}, 400, "responses[0] is not a string"),
    ({"prompts": [{"role": "user"}], "responses": ["x"]}, 400, "prompts[0] is neither a string nor a list"),
    ({"prompts": ["a"] * 5000, "responses": ["x"] * 5000}, 413, "at most 4096 a request"),
])
def test_bad_requests_get_a_4xx_with_a_message(served, body, status, message):
    _, url = served
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    reply = httpx.post(f"{url}/score", **kwargs)
    assert reply.status_code == status and message in reply.json()["error"]


def test_a_client_killed_mid_request_does_not_stop_the_server(served):
    _, url = served
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"prompts": ["sort: b a"] * 200, "responses": ["a b"] * 200}).encode()
    for cut in (len(body) // 2, len(body)):  # gone while sending the body, and while the server scores it
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:cut])
    assert httpx.get(f"{url}/health").status_code == 200
    assert len(httpx.post(f"{url}/score", json={"prompts": ["a"], "responses": ["b"]}).json()["scores"]) == 1


def test_a_dead_server_is_one_line_not_a_hang():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ConfigError, match=f"no reward server answers at {url}/health .*make serve-rm"):
        rewards.terms([url], [])
    started = time.time()
    with pytest.raises(RuntimeError, match=f"the reward server at {url} did not answer in 2 tries"):
        ServerReward(url, timeout=1, retries=2)(prompts=["a"], completions=["b"])
    assert time.time() - started < 10


def test_ppo_through_the_server_trains_as_ppo_scored_in_process_from_text(served, tmp_path):
    """5 steps, the same seed: rewarded by the server, and by a function scoring the same texts in-process; the
    per-step rewards agree within 1e-4."""
    root, url = served
    (tmp_path / "by_text.py").write_text(
        "from transformers import AutoModelForSequenceClassification\n"
        "from alignment import loading, registry, scoring\n"
        "from alignment.store import Store\n"
        "_held = {}\n"
        "def by_text(prompts, completions, **_):\n"
        "    if not _held:\n"
        f"        rm = Store({str(root)!r}).get('tiny-llama', 'rm')\n"
        "        spec = registry.get(rm.manifest['model'], template=rm.manifest['template'], tokenizer=rm.path)\n"
        "        tok = loading.load_tokenizer(rm.path, spec)\n"
        "        _held.update(spec=spec, tok=tok, model=loading.load_model(rm.path, "
        "AutoModelForSequenceClassification, spec, tokenizer=tok).eval())\n"
        "    texts = [_held['spec'].format_prompt(p) + c for p, c in zip(prompts, completions)]\n"
        "    return scoring.score_texts(_held['model'], _held['tok'], texts)[0]\n")
    logs = {}
    for name, source in (("server", url), ("in_process", f"{tmp_path}/by_text.py:by_text")):
        store = tmp_path / name
        for stage in ("sft", "rm"):
            (store / "tiny-llama").mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-r", str(root / "tiny-llama" / stage), str(store / "tiny-llama" / stage)],
                           check=True)
        ppo_stage.main([f"store={store}", *COMMON, "ppo.steps=5", "ppo.batch_size=8", "ppo.mini_batch_size=8",
                        "ppo.ppo_epochs=1", "ppo.max_new_tokens=8", "ppo.eval_every=0", "ppo.eval_samples=1",
                        f"ppo.rewards=[{source}]", "precision=fp32"])
        ckpt = Store(store).get("tiny-llama", "ppo")
        logs[name] = [json.loads(line) for line in open(ckpt.path / "ppo_log.jsonl")]
    assert [r["step"] for r in logs["server"]] == [1, 2, 3, 4, 5]
    for a, b in zip(logs["server"], logs["in_process"], strict=True):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-4)
        assert a[f"reward/{'server'}"] == pytest.approx(b["reward/by_text"], abs=1e-4)
