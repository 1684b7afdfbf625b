"""A store reward model served over HTTP, and the client an RL stage scores through (`rewards=[http://...]`).

    make serve-rm RUN=<run> [PORT=8100]        (= python -m alignment serve-rm <run>/rm --port 8100)

Routes: POST /score with {"prompts": [...], "responses": [...]} (prompts as the data gives them: strings, or lists
of {role, content} messages; responses as text) -> {"scores": [...]}, each the reward model's score of the
prompt in its template followed by the response and the end token, exactly as the stages score a policy's text
(scoring.score_texts); GET /health -> {"status": "ok", "checkpoint", "model"}. A request that is not such JSON gets
a 4xx with a message; a client that goes away mid-request costs the server nothing but the scoring it asked for.

Built on Starlette (the ASGI toolkit FastAPI is built on, without FastAPI's schema layer, which two routes do not
need) and served by uvicorn (the reference ASGI server) in one process: one copy of the model, its forwards run one
request at a time in a worker thread while the event loop keeps answering /health. The client is httpx's, with a
timeout per request and retries; a server that stays dead stops the stage in one line.
"""

from __future__ import annotations

import threading
import time

MAX_ITEMS = 4096  # responses per request; more is refused (413): batch them


class RequestError(ValueError):
    pass


def parse_request(body) -> tuple[list, list[str]]:
    """(prompts, responses) of a /score request body (parsed JSON); RequestError says what is wrong with it."""
    if not isinstance(body, dict) or not {"prompts", "responses"} <= set(body):
        raise RequestError('expected a JSON object {"prompts": [...], "responses": [...]}')
    prompts, responses = body["prompts"], body["responses"]
    if not isinstance(prompts, list) or not isinstance(responses, list):
        raise RequestError("prompts and responses must be lists")
    if len(prompts) != len(responses):
        raise RequestError(f"{len(prompts)} prompts for {len(responses)} responses: give one prompt per response")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise RequestError(f"responses[{i}] is not a string")
    for i, prompt in enumerate(prompts):
        messages = isinstance(prompt, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt)
        if not isinstance(prompt, str) and not messages:
            raise RequestError(f"prompts[{i}] is neither a string nor a list of {{role, content}} messages")
    return prompts, responses


def app(checkpoint):
    """The ASGI application serving checkpoint (a store reward model) on this machine's device."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from transformers import AutoModelForSequenceClassification

    from alignment import loading, registry, scoring

    spec = registry.get(checkpoint.manifest["model"], template=checkpoint.manifest["template"],
                        tokenizer=checkpoint.path)
    tokenizer = loading.load_tokenizer(checkpoint.path, spec)
    model = loading.on_device(loading.load_model(checkpoint.path, AutoModelForSequenceClassification, spec,
                                                 tokenizer=tokenizer)).eval()
    lock = threading.Lock()  # one forward at a time: one model, and a tokenizer whose padding side is set per call

    def score(prompts: list, responses: list[str]) -> list[float]:
        with lock:
            return scoring.score_texts(model, tokenizer, [spec.format_prompt(p) + r
                                                          for p, r in zip(prompts, responses, strict=True)])[0]

    async def score_route(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        try:
            prompts, responses = parse_request(body)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        if len(responses) > MAX_ITEMS:
            return JSONResponse({"error": f"{len(responses)} responses: at most {MAX_ITEMS} a request"},
                                status_code=413)
        return JSONResponse({"scores": await run_in_threadpool(score, prompts, responses)})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "checkpoint": checkpoint.id, "model": spec.name})

    return Starlette(routes=[Route("/score", score_route, methods=["POST"]), Route("/health", health)])


def serve(checkpoint, host: str, port: int) -> None:
    import uvicorn

    print(f"[serve-rm] {checkpoint.id} on http://{host}:{port} (POST /score, GET /health)", flush=True)
    uvicorn.run(app(checkpoint), host=host, port=port, log_level="warning")


class ServerReward:
    """A reward term scored by a reward server (rewards.py's source http://host:port): TRL's reward-function
    signature, so it mixes like any function. Each call posts one request, retried `retries` times `timeout`
    seconds apart at most; a server that does not answer raises RuntimeError saying so (one line at the stage)."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3):
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries
        self.__name__ = "server"

    def check(self) -> dict:
        """The server's /health, or RuntimeError in one line (called at start-up: a stage does not train without
        its judge)."""
        import httpx

        try:
            reply = httpx.get(f"{self.url}/health", timeout=min(self.timeout, 10.0))
            reply.raise_for_status()
            return reply.json()
        except (httpx.HTTPError, ValueError) as e:
            raise RuntimeError(f"no reward server answers at {self.url}/health ({type(e).__name__}: {e}); start "
                               "one with `make serve-rm RUN=<run>`") from None

    def __call__(self, prompts: list, completions: list[str], **_) -> list[float]:
        import httpx

        last = None
        for attempt in range(self.retries):
            try:
                reply = httpx.post(f"{self.url}/score", json={"prompts": prompts, "responses": completions},
                                   timeout=self.timeout)
                if reply.status_code // 100 == 4:  # our request is wrong: retrying will not mend it
                    raise RuntimeError(f"the reward server at {self.url} refused the request: "
                                       f"{reply.json().get('error', reply.text)}")
                reply.raise_for_status()
                return reply.json()["scores"]
            except (httpx.HTTPError, ValueError, KeyError) as e:
                last = e
                time.sleep(min(2.0**attempt, 10.0))
        raise RuntimeError(f"the reward server at {self.url} did not answer in {self.retries} tries of "
                           f"{self.timeout:.0f} s ({type(last).__name__}: {last})")
