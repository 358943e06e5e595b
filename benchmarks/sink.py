"""A local HTTP/1.1 endpoint that answers every POST at once (for the benchmarks).

    python benchmarks/sink.py --port 8080 --mode ok      # 200 {} (Helicone, OTLP, webhook)
    python benchmarks/sink.py --port 8080 --mode lunary  # 200 {"results": [...]} per event

Keep-alive, one asyncio task per connection, no logging; it stops on SIGTERM. Lunary
mode answers one success per event of ``{"events": [...]}``, keyed by the event's
``runId`` as Lunary does.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import orjson


def _answer(mode: str, body: bytes) -> bytes:
    if mode == "lunary":
        events = orjson.loads(body).get("events") or []
        return orjson.dumps({"results": [{"id": e.get("runId"), "success": True} for e in events]})
    return b"{}"


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: str) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            chunked = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                parts = []
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    chunk = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    parts.append(chunk[:-2])
                body = b"".join(parts)
            else:
                body = await reader.readexactly(length) if length else b""
            reply = _answer(mode, body)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(reply)).encode()
                + b"\r\n\r\n"
                + reply
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _main(port: int, mode: str) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve(r, w, mode), "127.0.0.1", port, backlog=1024
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["ok", "lunary"], default="ok")
    args = ap.parse_args()
    asyncio.run(_main(args.port, args.mode))


if __name__ == "__main__":
    main()
