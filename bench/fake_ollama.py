"""A local server speaking Ollama's HTTP API that answers every call in a fixed time.

It stands in for a model whose generation takes `--delay-ms` (50 by default), so the bench
can tell how much the mesh adds to an LLM call. It serves `GET /api/tags` (one model),
`POST /api/generate` and `POST /api/chat` (not streamed), with HTTP/1.1 keep-alive as the
`ollama` client uses it.

Run as `python -m bench.fake_ollama --port P`; it prints `ready` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json

__all__ = ["MODEL", "main"]

MODEL = "bench-model:latest"


def _tags() -> bytes:
    entry = {"name": MODEL, "model": MODEL, "size": 1, "digest": "0" * 64, "details": {}}
    return json.dumps({"models": [entry]}).encode()


def _answer(request: bytes, delay_ms: float, *, chat: bool) -> bytes:
    body = json.loads(request or b"{}")
    output = {"message": {"role": "assistant", "content": "ok"}} if chat else {"response": "ok"}
    return json.dumps(
        {
            "model": body.get("model", MODEL),
            "created_at": "2026-12-03T00:00:00Z",
            **output,
            "done": True,
            "done_reason": "stop",
            "total_duration": int(delay_ms * 1e6),
            "load_duration": 0,
            "prompt_eval_count": 1,
            "prompt_eval_duration": 1000,
            "eval_count": 1,
            "eval_duration": int(delay_ms * 1e6),
        }
    ).encode()


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            request = await reader.readexactly(length) if length else b""
            if path.startswith(("/api/chat", "/api/generate")) and method == "POST":
                await asyncio.sleep(delay_s)
                chat = path.startswith("/api/chat")
                status, body = "200 OK", _answer(request, delay_s * 1000, chat=chat)
            elif path.startswith("/api/tags"):
                status, body = "200 OK", _tags()
            else:
                status, body = "404 Not Found", b'{"error":"not found"}'
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def _serve(port: int, delay_s: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(r, w, delay_s), "127.0.0.1", port
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="Ollama-protocol server with a fixed answer time")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
