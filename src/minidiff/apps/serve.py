"""``minidiff serve``: a small local web page over the shipped models (Starlette + uvicorn).

Pick a model, sampler, step count, class and guidance (conditional models), seed and number of
images; see the grid, the denoising trajectory of the first image, the latency, and the model's
parameters and size. Why not Gradio: measured here, it installs 54 packages (367 MB) and takes
~4 s to import, against 9 packages and ~0.3 s for Starlette + uvicorn
(``benchmarks/results/serve_choice.md``).

Safety: binds to 127.0.0.1, and another address only with ``--allow-network`` (the page is then
open to every machine that reaches it); a loopback server answers only requests whose ``Host``
is its own address with its port or ``localhost[:port]`` (HTTP 421 otherwise), so a web page
whose name was rebound to 127.0.0.1 (DNS rebinding) cannot read or drive it; a ``POST`` whose
``Origin`` is not the served origin is refused (HTTP 403), so another site's page cannot make
the browser spend this CPU either (:class:`Binding`); the client names a shipped model, never a
path; a request body over ``MAX_BODY_BYTES`` (64 KB; the form sends a few hundred bytes) is
refused with HTTP 413, from its Content-Length before reading anything, and a body without one
is read no further than the limit; every field is validated on the server (type and range) and
a bad one is answered with HTTP 422 and one line saying which field and what is allowed; each
request is stopped after ``max_seconds`` of network evaluations (HTTP 408).

One request at a time: sampling already spreads over the CPU's cores (torch's threads), so
a second one at once would only slow both. A second ``/api/generate`` while one runs is
answered at once with HTTP 503 and one line (``busy: ...``) instead of waiting for the lock: a
queued request would wait up to ``max_seconds`` per request ahead of it, past its client's
patience, with nothing on the page to say why. 503 rather than 429 because the limit is the
server's capacity, not this client's rate (429 means "you sent too many"; the busy request may
be another tab's first).

The module imports torch and the model code only where models are loaded and sampled
(:class:`ModelPool`), so that request validation (:class:`GenerateRequest`) and the page load
without them; Starlette and uvicorn, the ``serve`` extra, only in :func:`create_app` and
:func:`serve`.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import threading
import time
from importlib import resources

import numpy as np

from ..errors import MinidiffError
from ..files import grid_png
from ..settings import SAMPLER_NAMES, SamplingConfig

MAX_IMAGES = 64
IMAGES = 40  # a request's default: four rows of 0-9 when every class is drawn, five of 8
MAX_STEPS = 1000
MAX_GUIDANCE = 10.0
MAX_BODY_BYTES = 64 * 1024
TRAJECTORY_FRAMES = 8
BUSY = "busy: one request runs at a time; retry when it finishes"
DEFAULTS = SamplingConfig(batch_size=MAX_IMAGES)  # a request is sampled as one batch
# The page opens on the first of these that is shipped: the fastest model that meets its quality
# goal (docs/distillation.md, "Results"), else the teacher.
OPENS_ON = ("reduced-cond-2step", "reduced")
ALL = "all"  # the class of a request that draws the classes in turn (0, 1, ..., 9, 0, ...)


class RequestError(ValueError):
    """A request field out of type or range: one line for the page."""


class BodyTooLarge(RequestError):
    """A request body over :data:`MAX_BODY_BYTES` (HTTP 413)."""

    def __init__(self, limit: int):
        super().__init__(f"the request body is over the {limit // 1024} KB limit: send only "
                         "the form's JSON fields (model, sampler, steps, n, seed, class, "
                         "guidance)")


class Busy(RuntimeError):
    """Another request is sampling (HTTP 503)."""


class Deadline(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Binding:
    """Where the server listens, and so which requests it answers (see the module docstring)."""

    host: str = "127.0.0.1"
    port: int = 7860
    network: bool = False  # --allow-network: any Host, for a page open to the network

    def __post_init__(self):
        if not self.network and not is_loopback(self.host):
            raise MinidiffError(f"--host {self.host} opens the page to the network: pass "
                                "--allow-network as well, or leave --host at 127.0.0.1")

    @property
    def url(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{name}:{self.port}/"

    def hosts(self) -> frozenset[str]:
        """The ``Host`` headers a loopback server answers: its address with its port and
        ``localhost`` (a browser leaves the port out only for port 80)."""
        name = f"[{self.host}]" if ":" in self.host else self.host
        return frozenset({f"{name}:{self.port}".lower(), f"localhost:{self.port}", "localhost",
                          *((name.lower(),) if self.port == 80 else ())})

    def refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """Why a request with these (lower-case) ``headers`` is not answered -> (HTTP status,
        one line), or None."""
        host = headers.get("host", "")
        if not self.network and host.lower() not in self.hosts():
            return 421, f"Host {host!r} is not this server's address; open {self.url}"
        origin = headers.get("origin")
        if method == "POST" and origin is not None and origin.lower() != f"http://{host}".lower():
            return 403, (f"a page from {origin} may not use this server; generate from the page "
                         f"at http://{host}/")
        return None


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware: answers what :meth:`Binding.refusal` refuses with its status and one
    line (``{"error": ...}``) before the app sees the request."""

    def __init__(self, app, binding: Binding):
        self.app, self.binding = app, binding

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope["headers"]}
            refused = self.binding.refusal(scope["method"], headers)
            if refused:
                status, message = refused
                body = json.dumps({"error": message}).encode()
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """One validated ``/api/generate`` body."""

    model: str
    sampler: str
    steps: int
    n: int
    seed: int
    cls: int | str | None  # a class id, ALL, or None (unconditional)
    guidance: float | None

    @classmethod
    def parse(cls, body: dict, models: dict[str, dict]) -> "GenerateRequest":
        """Validate a JSON body; raises :class:`RequestError` naming the field and the fix."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")

        def integer(name, lo, hi, default=None, other=""):
            v = body.get(name, default)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise RequestError(f"{name} must be {other}an integer in {lo}..{hi}, got {v!r}")
            return v

        model = body.get("model")
        if model not in models:
            raise RequestError(f"model must be one of {', '.join(models)}, got {model!r}")
        info = models[model]
        own = info.get("student")  # a distilled student's own sampler and step counts
        sampler = body.get("sampler", own["sampler"] if own else DEFAULTS.sampler)
        if sampler not in SAMPLER_NAMES:
            raise RequestError(f"sampler must be one of {', '.join(SAMPLER_NAMES)}, "
                               f"got {sampler!r}")
        steps = integer("steps", 1, MAX_STEPS, own["steps"] if own else DEFAULTS.steps)
        if own and (sampler != own["sampler"] or steps not in own["serves"]):
            raise RequestError(f"{model} is a distilled student: sampler must be "
                               f"{own['sampler']} and steps one of "
                               f"{', '.join(map(str, own['serves']))}")
        n = integer("n", 1, MAX_IMAGES, IMAGES)
        seed = integer("seed", 0, 2**31 - 1, DEFAULTS.seed)
        c, g = body.get("class"), body.get("guidance")
        if info["conditional"]:
            if c is None and own:  # its guidance is built in: it is never drawn without a class
                c = ALL
            elif c is not None and c != ALL:
                c = integer("class", 0, info["num_classes"] - 1, other=f'"{ALL}" or ')
            if g is not None:
                if isinstance(g, bool) or not isinstance(g, (int, float)) or \
                        not 0 <= g <= MAX_GUIDANCE:
                    raise RequestError(f"guidance must be a number in 0..{MAX_GUIDANCE:g}, "
                                       f"got {g!r}")
                g = float(g)
            if own and g is not None:
                raise RequestError(f"{model} is a distilled student: its guidance "
                                   f"({own['guidance']}) is built in; send no guidance")
            if c is None or own:
                g = None
            elif g is None:
                g = DEFAULTS.guidance
        elif c is not None or g is not None:
            raise RequestError(f"{model} is unconditional: class and guidance need a "
                               "conditional model (e.g. reduced-cond)")
        return cls(model, sampler, steps, n, seed, c, g)

    def sampling(self) -> SamplingConfig:
        """How this request is sampled: its fields over the defaults."""
        return dataclasses.replace(DEFAULTS, sampler=self.sampler, steps=self.steps,
                                   seed=self.seed, guidance=self.guidance)


def _png(images: np.ndarray, nrow: int) -> str:
    """uint8 ``[N x H x W]`` -> a base64 PNG grid, as `minidiff grid` draws it."""
    return base64.b64encode(grid_png(images, nrow=nrow)).decode()


class ModelPool:
    """Loads the shipped models once and samples one request at a time."""

    def __init__(self, max_seconds: float = 60.0):
        from ..checkpoint import shipped_models

        self.max_seconds = max_seconds
        self.lock = threading.Lock()
        self._models: dict[str, tuple] = {}
        self.info: dict[str, dict] = {}
        for name in shipped_models():
            self.info[name] = self._describe(name)

    def _describe(self, name: str) -> dict:
        from ..checkpoint import dataset_of, resolve
        from ..unet import count_params

        model, config = self._load(name)
        size = resolve(name)[0].stat().st_size
        return {"params": count_params(model), "size_mb": round(size / 2**20, 2),
                "conditional": bool(model.config.num_classes),
                "num_classes": model.config.num_classes or 0,
                "dataset": dataset_of(config),
                "student": config.get("sampling")}

    def _load(self, name: str):
        if name not in self._models:
            from ..checkpoint import load_checkpoint

            model, config, _ = load_checkpoint(name)
            self._models[name] = (model, config)
        return self._models[name]

    def run(self, req: GenerateRequest) -> dict:
        """Sample ``req``; raises :class:`Busy` at once if another request is sampling."""
        if not self.lock.acquire(blocking=False):
            raise Busy(BUSY)
        try:
            return self._sample(req)
        finally:
            self.lock.release()

    def _sample(self, req: GenerateRequest) -> dict:
        import torch

        from ..generation import resolve_sampling, time_generation, to_uint8

        model, config = self._load(req.model)
        cfg, sched = resolve_sampling(req.sampling(), config, torch.device("cpu"))
        frames: list[np.ndarray] = []
        stop_at = time.perf_counter() + self.max_seconds

        def watch(state):
            frames.append(to_uint8(state["x"][:1]).cpu().numpy()[0, 0])
            if time.perf_counter() > stop_at:
                raise Deadline

        if req.cls == ALL:
            y = torch.arange(req.n) % model.config.num_classes
        else:
            y = None if req.cls is None else torch.full((req.n,), req.cls, dtype=torch.long)
        try:
            run = time_generation(model, sched, cfg, req.n, y=y, callback=watch)
        except Deadline:
            raise RequestError(f"stopped after {self.max_seconds:g} s: ask for fewer "
                               "steps or images") from None
        images, seconds, steps = run.result, run.seconds, cfg.steps
        pick = np.linspace(0, len(frames) - 1, min(TRAJECTORY_FRAMES, len(frames))).round()
        strip = np.stack([frames[int(k)] for k in pick])
        row = model.config.num_classes if req.cls == ALL else 8  # one class per column
        return {"grid": _png(images.numpy(), nrow=min(row, req.n)),
                "trajectory": _png(strip, nrow=len(strip)),
                "latency_s": round(seconds, 3), "n": req.n, "steps": steps,
                "sampler": req.sampler, "model": req.model, **self.info[req.model],
                "class": req.cls, "guidance": req.guidance, "seed": req.seed}


async def read_body(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """A Starlette request's body; raises :class:`BodyTooLarge` past ``limit`` bytes, from the
    Content-Length before reading anything, else after reading at most one chunk past it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return bytes(body)


def create_app(max_seconds: float = 60.0, binding: Binding = Binding()):
    """The Starlette app, answering only what ``binding`` allows (:class:`Guard`)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    pool = ModelPool(max_seconds)
    page = resources.files("minidiff").joinpath("assets/serve.html").read_text()

    def error(message: str, status: int, **headers) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def index(_):
        return HTMLResponse(page)

    async def models(_):
        defaults = {k: getattr(DEFAULTS, k) for k in ("sampler", "steps", "guidance", "seed")}
        defaults["n"] = IMAGES
        opens = next((m for m in OPENS_ON if m in pool.info), next(iter(pool.info), None))
        return JSONResponse({"models": pool.info, "samplers": list(SAMPLER_NAMES),
                             "defaults": defaults, "opens_on": opens,
                             "limits": {"n": MAX_IMAGES, "steps": MAX_STEPS,
                                        "guidance": MAX_GUIDANCE}})

    async def generate(request: Request):
        try:
            body = json.loads(await read_body(request))
        except BodyTooLarge as e:
            # the rest of the body is never read, so the connection cannot be reused
            return error(str(e), 413, connection="close")
        except ValueError:
            return error("the request body must be JSON", 422)
        try:
            req = GenerateRequest.parse(body, pool.info)
        except RequestError as e:
            return error(str(e), 422)
        try:
            return JSONResponse(await run_in_threadpool(pool.run, req))
        except Busy as e:
            return error(str(e), 503)
        except RequestError as e:
            return error(str(e), 408)

    return Starlette(routes=[Route("/", index), Route("/api/models", models),
                             Route("/api/generate", generate, methods=["POST"])],
                     middleware=[Middleware(Guard, binding=binding)])


def serve(binding: Binding = Binding(), max_seconds: float = 60.0) -> None:
    from importlib.util import find_spec

    if find_spec("starlette") is None or find_spec("uvicorn") is None:
        raise MinidiffError("minidiff serve needs its extra: pip install 'minidiff[serve]'")
    import uvicorn

    uvicorn.run(create_app(max_seconds, binding), host=binding.host, port=binding.port,
                log_level="warning")
