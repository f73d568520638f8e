"""`create_app(settings)`: the FastAPI app behind `sdtune ui`: the web UI (static files written by the project), A1111's
API under /sdapi/v1 and sdtune's under /sdtune/v1, over one job queue and one GenerationService.

Safety, for every route: HTTP basic auth when `auth` is set (UI and API, like A1111's --api-auth); a request that
changes state (POST/PUT/DELETE) from another origin is refused unless the server listens on the network with auth;
request bodies are bounded; errors are JSON with one line (`SdtuneError` -> 422, a path outside the configured
folders -> 403, a full queue -> 503), never a traceback.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdtune.errors import NotFound, SdtuneError
from sdtune.server.engine import GenerationService
from sdtune.server.folders import ModelFolders, PathRefused
from sdtune.server.jobs import JobQueue, QueueFull
from sdtune.server.recipes import RecipeRegistry
from sdtune.server.runs import RunRegistry

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 2**20  # bytes of one request (a PNG for png-info, base64)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass
class Settings:
    folders: ModelFolders = field(default_factory=ModelFolders)
    auth: tuple[str, str] | None = None   # (user, password) for HTTP basic auth
    listen: bool = False                  # bound to all interfaces (then cross-origin writes need auth)
    api: bool = True                      # False (--no-api): /sdapi/v1 answers the web UI's own requests only
    device: str | None = None
    dtype: str | None = None
    # TrainConfig -> evaluator for `train(config, evaluator=...)`; the front door wires the toy judge in
    # (`sdtune.toy.concept_eval.evaluator_for`), so the server never imports the toy world
    evaluator_for: Callable[[Any], Any] | None = None
    # (WrongLoraSettings, the fields the request gave) -> the comparison's evaluator, after filling in the model's
    # defaults (`sdtune.cli.recipe.wrong_lora_model_defaults`: the toy world's on the tiny model)
    recipe_defaults: Callable[[Any, set[str]], Any] | None = None


class ServerState:
    """What the routes share: folders, the job queue, the generation service and the training runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.folders = settings.folders
        self.jobs = JobQueue()
        self.engine = GenerationService(self.folders, device=settings.device, dtype=settings.dtype)
        self.runs = RunRegistry(self.folders, self.jobs, settings.evaluator_for)
        self.recipes = RecipeRegistry(self.jobs)

    def token_counts(self, prompt: str) -> list[int]:
        """Tokens per 75-token chunk of the prompt's longest AND part, as A1111's counter shows them."""
        from sdtune.prompts.fragments import Blend
        from sdtune.prompts.parse import parse_prompt
        from sdtune.prompts.tokens import chunk_tokens

        gen = self.engine.loaded
        if gen is not None:
            tokenizer = gen.model.pipe.tokenizer or getattr(gen.model.pipe, "tokenizer_2", None)
            embeddings = getattr(gen.encode_prompt, "embeddings", None)
        else:
            from sdtune.models.tokenizer import tokenizer_for

            tokenizer, embeddings = tokenizer_for("tiny"), None
        best: list[int] = [0]
        for part in parse_prompt(prompt).parts:
            cond = part.schedule[0].cond
            frags = cond.parts[0][0] if isinstance(cond, Blend) else cond
            counts = [len(c) for c in chunk_tokens(frags, tokenizer, embeddings)] or [0]
            if sum(counts) > sum(best):
                best = counts
        return best

    def embedding_listing(self) -> dict[str, Any]:
        """A1111's /sdapi/v1/embeddings shape: loaded {name: {shape, vectors, ...}} and skipped."""
        gen = self.engine.generator()
        loaded: dict[str, Any] = {}
        skipped: dict[str, Any] = {}
        if self.folders.embeddings is not None:
            lib = gen.embeddings
            lib.refresh()
            for name in lib.names:
                emb = lib.embedding(name)
                if emb is None:
                    continue
                first = next(iter(emb.vectors.values()))
                loaded[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                "shape": int(first.shape[-1]), "vectors": int(first.shape[0])}
            for path, note in lib.skipped.items():
                skipped[Path(path).stem] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                            "shape": None, "vectors": None, "reason": note}
        return {"loaded": loaded, "skipped": skipped}

    def file_cards(self) -> dict[str, Any]:
        """The Generate page's LoRA and hypernetwork cards: name, the tag a click inserts, the family (read from the
        file's header), and the preview image's URL. Needs no model, so it stays off the job worker."""
        from sdtune.formats.identify import identify

        def family(path: Path) -> str | None:
            try:
                return identify(path).family
            except Exception:  # noqa: BLE001 - an unreadable file still gets a card, without a family
                return None

        def card(kind: str, f: Any, tag: str) -> dict[str, Any]:
            preview = f"/sdtune/v1/preview?kind={kind}&name={f.name}" if f.preview is not None else None
            return {"name": f.name, "tag": tag, "family": family(f.path), "preview": preview}

        return {"lora": [card("lora", f, f"<lora:{f.name}:1>") for f in self.folders.loras()],
                "hypernetwork": [card("hypernetwork", f, f"<hypernet:{f.name}:1>") for f in self.folders.hypernetworks()]}

    def embedding_cards(self) -> list[dict[str, Any]]:
        """Cards of the embeddings the loaded model can use (on the job worker: the library belongs to it)."""
        width_family = {768: "sd1", 1024: "sd2", 1280: "sdxl"}
        return [{"name": n, "tag": n, "family": width_family.get(v["shape"]), "preview": None}
                for n, v in sorted(self.embedding_listing()["loaded"].items())]


_BYTES_AS_TEXT: dict[Any, Callable[[Any], Any]] = {bytes: lambda b: b.decode("utf-8", "replace")}


def _error(status: int, message: str, kind: str) -> JSONResponse:
    """A1111's error shape ({error, detail, body, errors}) with one line."""
    return JSONResponse({"error": kind, "detail": message, "body": "", "errors": message}, status_code=status)


def _authorized(request: Request, auth: tuple[str, str]) -> bool:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user, auth[0]) & hmac.compare_digest(password, auth[1])


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True  # not a browser's cross-site request (scripts, curl, A1111 clients)
    return urlsplit(origin).netloc == request.headers.get("host", "")


def create_app(settings: Settings) -> FastAPI:
    from sdtune.server.a1111_api import a1111_router
    from sdtune.server.sdtune_api import sdtune_router
    from sdtune.version import __version__

    state = ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.jobs.stop()  # a running job is interrupted (a training run saves its state)

    app = FastAPI(title="sdtune", version=__version__, lifespan=lifespan,
                  description="sdtune's web UI API: AUTOMATIC1111's /sdapi/v1 and sdtune's /sdtune/v1.")
    app.state.sdtune = state

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if settings.auth is not None and not _authorized(request, settings.auth):
            return Response("authentication required", status_code=401,
                            headers={"WWW-Authenticate": 'Basic realm="sdtune"'})
        if request.method not in SAFE_METHODS and not _same_origin(request) \
                and not (settings.listen and settings.auth is not None):
            return _error(403, "a request from another origin may not change anything on this server", "Forbidden")
        if not settings.api and request.url.path.startswith("/sdapi/") and "x-sdtune-ui" not in request.headers:
            return _error(404, "the A1111 API is off (--no-api); it serves the web UI only", "NotFound")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return _error(413, f"request body over {MAX_BODY // 2**20} MB", "PayloadTooLarge")
        return await call_next(request)

    @app.exception_handler(PathRefused)
    async def refused(request: Request, exc: PathRefused) -> JSONResponse:
        return _error(403, str(exc), "Forbidden")

    @app.exception_handler(QueueFull)
    async def full(request: Request, exc: QueueFull) -> JSONResponse:
        return _error(503, str(exc), "QueueFull")

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return _error(404, str(exc).strip().splitlines()[0] if str(exc).strip() else "not found", "NotFound")

    @app.exception_handler(SdtuneError)
    async def bad_input(request: Request, exc: SdtuneError) -> JSONResponse:
        return _error(422, str(exc).strip().splitlines()[0] if str(exc).strip() else "bad request", "SdtuneError")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if isinstance(first.get("input"), (bytes, bytearray)):  # FastAPI read a body that was not sent as JSON
            kind = request.headers.get("content-type") or "none"
            return _error(422, f"the request body must be JSON: send it with Content-Type: application/json "
                               f"(got {kind})", "ValidationError")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg", "invalid"))
        return JSONResponse({"error": "ValidationError", "detail": jsonable_encoder(
            [{k: v for k, v in e.items() if k != "ctx"} for e in errors], custom_encoder=_BYTES_AS_TEXT),
            "errors": message, "body": ""}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """FastAPI's own refusals (no such route, a body that does not parse) in A1111's error shape, as A1111's
        API middleware answers them."""
        if exc.status_code < 400:
            return Response(status_code=exc.status_code, headers=exc.headers)
        return _error(exc.status_code, str(exc.detail), "HTTPException")

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed", request.url.path)
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return _error(500, f"{type(exc).__name__}: {message}", type(exc).__name__)

    app.include_router(a1111_router(state))
    app.include_router(sdtune_router(state))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app
