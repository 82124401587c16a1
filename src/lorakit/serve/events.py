"""A request's engine events, handed from the decoding thread into the server's event loop."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from .sequence import Event

POLL_S = 0.5  # how often a waiting handler checks that its client is still there


class Events:
    """Create inside the event loop; pass `sink` to `Engine.submit`, then await `next`."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def sink(self, event: Event) -> None:
        """Called from the engine's thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def next(self, request: Request) -> Event | None:
        """The next event, or None once the client has disconnected."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
