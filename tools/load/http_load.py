#!/usr/bin/python3
"""moed-http-load: many streams and idle connections against moed's OpenAI HTTP API.

Opens --idle keep-alive connections (each asks /health once, then stays idle), then runs
--streams concurrent streamed completions (stream_options.include_usage, ignore_eos) and checks
that every stream ends with [DONE], that its last chunk's usage counts exactly the tokens asked
for, and that every idle connection still answers at the end. Prints one summary line per
figure; with --json, one JSON object.

    tools/load/http_load.py --server 127.0.0.1:8000 --model demo --streams 256 --idle 2000
"""
import argparse
import asyncio
import json
import resource
import statistics
import sys
import time


async def read_response_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_body(reader, headers):
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    body = b""
    while True:  # chunked
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            return body
        body += await reader.readexactly(size)
        await reader.readline()


async def get(reader, writer, host, path):
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    status, headers = await read_response_head(reader)
    await read_body(reader, headers)
    return status


async def idle_connection(host, port, opened, release, results):
    try:
        reader, writer = await asyncio.open_connection(host, port)
        if await get(reader, writer, host, "/health") != 200:
            raise RuntimeError("health failed")
        opened.append(1)
        await release.wait()
        # Still open and served after the load?
        results.append(await get(reader, writer, host, "/health") == 200)
        writer.close()
    except Exception as error:  # counted as a failure
        results.append(False)
        print(f"idle connection failed: {error!r}", file=sys.stderr)


async def stream(host, port, model, max_tokens, index):
    body = json.dumps({
        "model": model, "prompt": f"Stream {index} tells a story", "max_tokens": max_tokens,
        "temperature": 0.8, "seed": index, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}).encode()
    start = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: " + host.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: " +
                 str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status, headers = await read_response_head(reader)
    if status != 200:
        raise RuntimeError(f"status {status}: {(await read_body(reader, headers))[:200]!r}")
    first_token = None
    usage = None
    done = False
    pending = b""
    while not done:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            break
        pending += await reader.readexactly(size)
        await reader.readline()
        while b"\n\n" in pending:
            event, pending = pending.split(b"\n\n", 1)
            data = event.decode()[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first_token is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first_token = time.monotonic() - start
    writer.close()
    return {"done": done, "usage": usage, "ttft": first_token, "seconds": time.monotonic() - start}


async def main(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port = args.server.rsplit(":", 1)
    opened, idle_results, release = [], [], asyncio.Event()
    idle_tasks = [asyncio.create_task(idle_connection(host, port, opened, release, idle_results))
                  for _ in range(args.idle)]
    deadline = time.monotonic() + 60
    while len(opened) + len(idle_results) < args.idle and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    start = time.monotonic()
    outcomes = await asyncio.gather(
        *[stream(host, port, args.model, args.max_tokens, i) for i in range(args.streams)],
        return_exceptions=True)
    wall = time.monotonic() - start
    release.set()
    await asyncio.gather(*idle_tasks)

    failures = [o for o in outcomes if isinstance(o, Exception)]
    good = [o for o in outcomes if not isinstance(o, Exception) and o["done"] and o["usage"]
            and o["usage"]["completion_tokens"] == args.max_tokens]
    ttfts = sorted(o["ttft"] for o in good if o["ttft"] is not None)
    tokens = sum(o["usage"]["completion_tokens"] for o in good)
    summary = {
        "streams": args.streams, "streams_ok": len(good), "stream_errors": len(failures),
        "idle": args.idle, "idle_opened": len(opened), "idle_ok_after": sum(idle_results),
        "max_tokens": args.max_tokens, "wall_seconds": round(wall, 2),
        "tokens_per_second": round(tokens / wall, 1) if wall else 0,
        "ttft_ms_p50": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
        "ttft_ms_max": round(1000 * ttfts[-1], 1) if ttfts else None,
    }
    for failure in failures[:5]:
        print(f"stream failed: {failure!r}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:20} {value}")
    ok = len(good) == args.streams and sum(idle_results) == args.idle
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="127.0.0.1:8000", help="the daemon's HTTP HOST:PORT")
    parser.add_argument("--model", required=True, help="the served model's id")
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="one JSON object")
    sys.exit(asyncio.run(main(parser.parse_args())))
