"""A TCP proxy in front of the S3 server that stalls one request on cue: a real network fault, no mock.

Everything is forwarded both ways until the client->server bytes of a connection contain ``trigger``
(e.g. ``b"PUT /bucket/tiny-llama/v1.0/adapter_model.safetensors"``). That connection then stalls:
with ``response_bytes=None`` the request never reaches S3; otherwise ``response_bytes`` bytes of the
answer (headers included) get through and the rest never does. ``stalled`` is set at that moment, so a
test can kill the client exactly there. It triggers once; later connections pass untouched.
"""

from __future__ import annotations

import asyncio
import contextlib


class StallProxy:
    def __init__(self, upstream: str, trigger: bytes, response_bytes: int | None = None) -> None:
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.trigger = trigger
        self.response_bytes = response_bytes
        self.stalled = asyncio.Event()
        self.triggered = False
        self._closing = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> StallProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> StallProxy:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            client_writer.close()
            return
        self._writers += [client_writer, server_writer]
        budget: list[int | None] = [None]  # response bytes still let through once this connection triggered
        for pump in (
            self._requests(client_reader, server_writer, budget),
            self._responses(server_reader, client_writer, budget),
        ):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _stall(self) -> None:
        self.stalled.set()
        await self._closing.wait()

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: list[int | None]
    ) -> None:
        tail = b""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(65536):
                window, tail = tail + chunk, (tail + chunk)[-len(self.trigger) :]
                if not self.triggered and self.trigger in window:
                    self.triggered = True
                    if self.response_bytes is None:
                        await self._stall()  # the request never reaches S3
                        return
                    budget[0] = self.response_bytes
                writer.write(chunk)
                await writer.drain()
        writer.close()

    async def _responses(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: list[int | None]
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(65536):
                left = budget[0]
                if left is not None:
                    writer.write(chunk[:left])
                    await writer.drain()
                    budget[0] = left - len(chunk[:left])
                    if budget[0] == 0:
                        await self._stall()  # the rest of the answer never arrives
                        return
                    continue
                writer.write(chunk)
                await writer.drain()
        writer.close()
