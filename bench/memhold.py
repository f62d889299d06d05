"""Memory per idle socket (bench only): start a target under bench.memprobe, hold WARM then WARM+N idle sockets,
snapshot at both, check every socket still answers a ping. Prints RSS KiB per socket.
`python -m bench.memhold [--trace] [--n 2000] [--server] [--env K=V ...] -- MODULE [ARGS]` (ARGS may use {port})."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path

from .stack import REPO, free_port, proc_rss_kib, wait_http


async def open_clients(
    url: str, first: int, count: int, per: int = 5000
) -> tuple[list[asyncio.subprocess.Process], int]:
    clients = []
    opened = 0
    for start in range(first, first + count, per):
        c = min(per, first + count - start)
        source = f"127.0.0.{2 + (start // per) % 250}"
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.idle", "--client", url, str(start), str(c), source,
            cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert p.stdout is not None
        opened += int((await p.stdout.readline()) or b"0")
        clients.append(p)
    return clients, opened


async def snap(pid: int, d: Path, n: int) -> None:
    os.kill(pid, signal.SIGUSR1)
    while not (d / f"done{n}").exists():  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", type=int, default=0, help="tracemalloc frames (0: off)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--warm", type=int, default=200)
    ap.add_argument("--settle", type=float, default=2, help="seconds idle before the second measure")
    ap.add_argument("--dir", default="/tmp/mem/run")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = [x for x in a.cmd if x != "--"]
    d = Path(a.dir)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)  # noqa: ASYNC240
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PROBE_DIR": str(d), "PORT": str(port)}
    env.update(kv.split("=", 1) for kv in a.env)
    xs = [f"-Xtracemalloc={a.trace}"] if a.trace else []
    cmd = [c.replace("{port}", str(port)) for c in cmd]
    proc = await asyncio.create_subprocess_exec(sys.executable, *xs, "-m", "bench.memprobe", *cmd, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    clients = []
    try:
        await wait_http(f"{url}/healthz", 60)
        c0, o0 = await open_clients(url, 0, a.warm)
        clients += c0
        await asyncio.sleep(1)
        await snap(proc.pid, d, 0)
        rss0 = proc_rss_kib(proc.pid)
        c1, o1 = await open_clients(url, 10_000_000, a.n)
        clients += c1
        await asyncio.sleep(a.settle)
        await snap(proc.pid, d, 1)
        rss1 = proc_rss_kib(proc.pid)
        os.kill(proc.pid, signal.SIGUSR2)
        while not (d / "tree.txt").exists():  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        answered = 0
        for c in clients:
            assert c.stdin is not None and c.stdout is not None
            c.stdin.write(b"ping\n")
            await c.stdin.drain()
            answered += int((await c.stdout.readline()) or b"0")
        print(
            f"RESULT opened={o0}+{o1} answered={answered}/{o0 + o1} rss0={rss0} rss1={rss1}"
            f" kib_per_socket={(rss1 - rss0) / max(o1, 1):.2f} trace={a.trace} cmd={' '.join(cmd)} env={a.env}",
            flush=True,
        )
        (d / "n").write_text(str(o1))
    finally:
        for c in clients:
            if c.returncode is None:
                c.kill()
            await c.wait()
        proc.terminate()
        await proc.wait()


if __name__ == "__main__":
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main())
