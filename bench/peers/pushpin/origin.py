#!/usr/bin/env python3
"""Tiny GRIP origin for Pushpin: GET /stream/<channel> answers with an empty
text/event-stream that Pushpin holds open (Grip-Hold: stream) on channel <channel>."""
import asyncio
import sys


async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            path = line.split(" ")[1] if " " in line else "/"
            channel = path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "default"
            writer.write((
                "HTTP/1.1 200 OK\r\n"
                "Content-Type: text/event-stream\r\n"
                "Grip-Hold: stream\r\n"
                f"Grip-Channel: {channel}\r\n"
                "Content-Length: 0\r\n\r\n").encode())
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main(port):
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8090))
