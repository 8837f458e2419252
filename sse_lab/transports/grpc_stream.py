"""The chat as a gRPC server stream: `rpc Stream(ChatRequest) returns (stream Token)` (see chat.proto).

    grpc_chat() ── HTTP/2 on 127.0.0.1:P ──▶ serve_grpc_in_background(): grpc.aio server on its own thread
      connection preface, SETTINGS ───────▶   Chat.Stream(request)
      HEADERS + DATA(ChatRequest) ────────▶     the SSE endpoint's validation, the same token sources
                 ◀── DATA(Token) per token, a 5-byte gRPC prefix before each Protobuf message
                 ◀── trailers: grpc-status 0, finish-reason, tokens

The server is a separate one (gRPC needs HTTP/2, which uvicorn does not speak),
with its own `StreamStats` (`GrpcServer.stats()`) and the same `Settings`: a bad
field is INVALID_ARGUMENT with the parameter in the trailing metadata, every
slot taken is RESOURCE_EXHAUSTED, a model failing after the start is ABORTED
(trailing metadata `error-code`: model_error, content_filter, ...). The client
cancelling (RST_STREAM) cancels the handler at its next await, so the model stops,
as on the SSE endpoint. The time limit (`max_stream_s`) is checked between tokens.

The generated modules `chat_pb2*.py` are checked in; chat.proto says how to regenerate them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict

import grpc

from ..handles import Stoppable
from ..metrics import ChatResult
from ..model import MODELS, TokenSource
from ..server import InvalidParameter, Settings, StreamStats, TooManyStreams
from . import chat_pb2, chat_pb2_grpc
from .generation import Done, Token, TokenRun, parse_chat, take_slot

OPTIONAL_FIELDS = ("model", "max_tokens", "ttft_ms", "token_ms", "jitter_ms", "seed")
MAX_MESSAGE_BYTES = 64 * 1024  # a request holds at most an 8,000-character prompt
STOP_GRACE_S = 0.2
STARTUP_TIMEOUT_S = 10.0
# Each channel its own connection, no proxy from the environment: a measurement sees its own set-up.
CLIENT_OPTIONS = (("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0))


class _ChatServicer(chat_pb2_grpc.ChatServicer):
    def __init__(self, settings: Settings, models: Mapping[str, TokenSource], stats: StreamStats) -> None:
        self.settings = settings
        self.models = models
        self.stats = stats

    async def Stream(  # the name is the proto's
        self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.Token]:
        params: dict[str, object] = {"prompt": request.prompt}
        params.update({name: getattr(request, name) for name in OPTIONAL_FIELDS if request.HasField(name)})
        try:
            source, generation, options = parse_chat(params, self.settings, self.models, path="/grpc/Stream")
            take_slot(self.settings, self.stats)
        except InvalidParameter as invalid:
            details = f"{invalid.parameter}: {invalid.reason}"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details, (("parameter", invalid.parameter),))
        except TooManyStreams:
            details = f"all {self.settings.max_concurrent_streams} stream slots are taken; try again shortly"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
        run = TokenRun(source, generation, options, self.settings, self.stats)
        messages = run.messages()
        deadline = asyncio.get_running_loop().time() + self.settings.max_stream_s
        try:
            async for message in messages:
                if asyncio.get_running_loop().time() > deadline:
                    run.outcome = "failed"
                    limit = f"the stream ran longer than the limit of {self.settings.max_stream_s:g} s"
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, limit, (("error-code", "timeout"),))
                if isinstance(message, Token):
                    yield chat_pb2.Token(token=message.token, index=message.index)
                elif isinstance(message, Done):
                    context.set_trailing_metadata(
                        (("finish-reason", message.finish_reason), ("tokens", str(message.tokens)))
                    )
                else:
                    await context.abort(grpc.StatusCode.ABORTED, message.message, (("error-code", message.code),))
        except asyncio.CancelledError:  # the client cancelled or left
            run.client_gone = True
            raise
        finally:
            await messages.aclose()
            run.end()


class _GrpcThread:
    """The grpc.aio server, its thread and loop: everything `stop()` needs, and no handle."""

    def __init__(self, settings: Settings, models: Mapping[str, TokenSource], host: str, port: int) -> None:
        self.stats = StreamStats()
        self.servicer = _ChatServicer(settings, models, self.stats)
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = 0
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="sse-lab-grpc", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # reported to the starting thread
            self.error = error
        finally:
            self.started.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        options = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0))
        server = grpc.aio.server(options=options)
        chat_pb2_grpc.add_ChatServicer_to_server(self.servicer, server)
        self.port = server.add_insecure_port(self.address)
        await server.start()
        self.started.set()
        try:
            await self.stopping.wait()
        finally:
            await server.stop(STOP_GRACE_S)

    def start(self, timeout_s: float) -> None:
        self.thread.start()
        if not self.started.wait(timeout_s) or self.error is not None or not self.port:
            self.stop()
            raise RuntimeError(f"the gRPC server did not start on {self.address}: {self.error or 'timed out'}")

    def stop(self) -> None:
        if self.loop is not None and self.stopping is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(STOP_GRACE_S + 2.0)


class GrpcServer(Stoppable):
    """Handle on a gRPC chat server in this process: its `target` ("127.0.0.1:port"), `stats()` and `stop()`.

    It also stops when the handle is garbage collected, like `serve_in_background`'s.
    """

    def __init__(self, running: _GrpcThread, host: str) -> None:
        self.host = host
        self.port = running.port
        self.target = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self._running = running
        self._stop = weakref.finalize(self, running.stop)

    def stats(self) -> dict[str, int]:
        """The server's stream counters, as `GET /api/stats` reports the HTTP app's."""
        return asdict(self._running.stats)

    def stop(self) -> None:
        """Stop the server (open calls get {STOP_GRACE_S} s) and its thread; idempotent."""
        self._stop()


def serve_grpc_in_background(
    settings: Settings | None = None,
    *,
    models: Mapping[str, TokenSource] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> GrpcServer:
    """Start the gRPC chat server on its own thread, on loopback and a free port; return once it serves.

    >>> with serve_grpc_in_background() as server:
    ...     server.target.startswith("127.0.0.1:")
    True
    """
    running = _GrpcThread(settings or Settings(), dict(MODELS if models is None else models), host, port)
    running.start(STARTUP_TIMEOUT_S)
    return GrpcServer(running, host)


def chat_request(prompt: str, **params: object) -> chat_pb2.ChatRequest:
    """A ChatRequest from the SSE endpoint's parameters (prompt, model, max_tokens, ttft_ms, ...)."""
    return chat_pb2.ChatRequest(prompt=prompt, **params)  # type: ignore[arg-type]


def grpc_chat(target: str, prompt: str, *, timeout_s: float = 30.0, **params: object) -> ChatResult:
    """Stream a chat over a fresh channel (its own connection) and record when each token arrived.

    The clock starts before the channel connects, as `stream_chat`'s does before
    its TCP connection: TTFT includes the set-up. `headers_at` is when the
    response's initial metadata came (grpc.aio sends it with the first token). A
    call that ends in an error status records it in `result.error`
    (`{"code": "ABORTED", "message": ...}` plus the trailing metadata).
    """
    result = ChatResult(mode="grpc", started_at=time.perf_counter())
    with grpc.insecure_channel(target, options=CLIENT_OPTIONS) as channel:
        call = chat_pb2_grpc.ChatStub(channel).Stream(chat_request(prompt, **params), timeout=timeout_s)
        try:
            call.initial_metadata()  # the response's HEADERS frame: grpc.aio sends it with the first message
            result.headers_at = time.perf_counter()
            for token in call:
                result.arrivals.append(time.perf_counter())
                result.text += token.token
        except grpc.RpcError:
            pass
        result.finished_at = time.perf_counter()
        trailers = dict(call.trailing_metadata() or ())
        if call.code() == grpc.StatusCode.OK:
            result.finish_reason = str(trailers.get("finish-reason"))
        else:
            result.error = {"code": call.code().name, "message": call.details(), **trailers}
    return result
