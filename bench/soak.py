#!/usr/bin/env python3
"""Soak (issue 16): mixed I/O over 32 connections for a long while; memory flat, nothing lost.

    python bench/soak.py [--duration 600] [--connections 32] [--sample 5] [--server reference]
                         [--json FILE]

Starts the server (by default ``python3 -m reference_server --memory SIZE -t
-e 0`` on a Unix socket in a temporary directory; ``--server`` takes any
name bench_servers.py knows), opens N libnbd connections, each in its own thread
and each owning its own region of the export, and runs a random mix of
writes (some with FUA), reads, flushes, trims and block-status queries of
4 KiB to 64 KiB until the duration is over.  Each thread keeps a shadow of
its region: every read is checked against it as it happens, and every
NBD_STATE_ZERO extent that block status reports must hold zeroes where the
shadow knows the data (a trimmed block is unknown until it is written again).
At the end each thread reads its whole region back and compares it.

The server's RSS (VmRSS) is sampled every few seconds; the summary gives the
curve (a sample a minute), its minimum and maximum after the warm-up, and the
slope over the second half in MiB per minute.  Exit status 1 if any check
failed or a connection broke.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nbd  # libnbd's bindings, from Debian's python3-libnbd
from bench_servers import REPO, SERVERS, BenchError, Server, running

MiB = 1024 * 1024
BLOCK = 4096
STATE_ZERO = 2  # base:allocation: NBD_STATE_ZERO
OPS = ("write", "read", "flush", "trim", "block_status")
WEIGHTS = (35, 30, 10, 10, 15)


@dataclass
class Worker:
    index: int
    region: int
    seed: int
    ops: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def base(self) -> int:
        return self.index * self.region

    def run(self, uri: str, until: float) -> None:
        rng = random.Random(self.seed)
        blocks = self.region // BLOCK
        shadow = bytearray(self.region)  # the export starts zeroed
        known = bytearray(b"\1" * blocks)  # 0: trimmed, content unspecified
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        try:
            h.connect_uri(uri)
            while time.monotonic() < until and len(self.errors) < 10:
                op = rng.choices(OPS, WEIGHTS)[0]
                first = rng.randrange(blocks)
                count = rng.randint(1, min(16, blocks - first))
                offset, length = first * BLOCK, count * BLOCK
                if op == "write":
                    data = rng.randbytes(length)
                    flags = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
                    h.pwrite(data, self.base + offset, flags)
                    shadow[offset : offset + length] = data
                    known[first : first + count] = b"\1" * count
                elif op == "read":
                    self._check(h.pread(length, self.base + offset), shadow, known, first, count)
                elif op == "flush":
                    h.flush()
                elif op == "trim":
                    h.trim(length, self.base + offset)
                    known[first : first + count] = bytes(count)
                else:
                    self._block_status(h, shadow, known, offset, length)
                self.ops[op] += 1
            self._check(h.pread(self.region, self.base), shadow, known, 0, blocks, final=True)
            h.shutdown()
        except nbd.Error as exc:
            self.errors.append(f"connection {self.index}: {exc}")

    def _check(
        self,
        data: bytes,
        shadow: bytearray,
        known: bytearray,
        first: int,
        count: int,
        final: bool = False,
    ) -> None:
        for b in range(count):
            if not known[first + b]:
                continue
            start = (first + b) * BLOCK
            got = data[b * BLOCK : (b + 1) * BLOCK]
            if got != shadow[start : start + BLOCK]:
                what = "final read-back" if final else "read"
                self.errors.append(
                    f"connection {self.index}: {what} of block at {self.base + start} differs "
                    "from what was written"
                )
                return

    def _block_status(
        self, h: nbd.NBD, shadow: bytearray, known: bytearray, offset: int, length: int
    ) -> None:
        extents: list[int] = []

        def collect(context: str, start: int, entries: list[int], error: object) -> int:
            if context == nbd.CONTEXT_BASE_ALLOCATION:
                extents.extend(entries)
            return 0

        h.block_status(length, self.base + offset, collect)
        if not extents:
            self.errors.append(f"connection {self.index}: block status returned no extent")
            return
        position = offset
        for extent_length, flags in zip(extents[::2], extents[1::2], strict=True):
            end = min(position + extent_length, offset + length)
            if flags & STATE_ZERO:
                for block in range(position // BLOCK, (end + BLOCK - 1) // BLOCK):
                    lo, hi = max(block * BLOCK, position), min((block + 1) * BLOCK, end)
                    if known[block] and any(shadow[lo:hi]):
                        self.errors.append(
                            f"connection {self.index}: block status says zero at "
                            f"{self.base + lo}, where data was written"
                        )
                        return
            position = end
            if position >= offset + length:
                break


def rss(server: Server) -> int | None:
    try:
        for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def summarise(samples: list[tuple[float, int]], duration: float) -> dict[str, object]:
    """The RSS curve in brief: per-minute points, min/max after warm-up, late slope."""
    # The final read-back (every region at once) is not part of the steady state.
    steady = [(t, r) for t, r in samples if t <= duration]
    warm = [(t, r) for t, r in steady if t >= min(60.0, duration / 4)]
    late = [(t, r) for t, r in steady if t >= duration / 2]
    slope = 0.0
    if len(late) >= 2:
        mean_t = sum(t for t, _ in late) / len(late)
        mean_r = sum(r for _, r in late) / len(late)
        var = sum((t - mean_t) ** 2 for t, _ in late)
        if var:
            slope = sum((t - mean_t) * (r - mean_r) for t, r in late) / var  # bytes per second
    step = 60.0 if duration >= 240 else max(duration / 8, 5.0)
    points: list[tuple[float, int]] = []
    for t, r in samples:
        if not points or t - points[-1][0] >= step:
            points.append((t, r))
    return {
        "peak_mib": round(max((r for _, r in samples), default=0) / MiB, 1),
        "points_mib": [(round(t), round(r / MiB, 1)) for t, r in points],
        "min_mib_after_warmup": round(min(r for _, r in warm) / MiB, 1) if warm else None,
        "max_mib_after_warmup": round(max(r for _, r in warm) / MiB, 1) if warm else None,
        "late_slope_mib_per_min": round(slope * 60 / MiB, 2),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of I/O; default 600")
    p.add_argument("--connections", type=int, default=32, help="connections; default 32")
    p.add_argument("--region", type=int, default=4, help="MiB each connection owns; default 4")
    p.add_argument("--sample", type=float, default=5, help="seconds between RSS samples")
    p.add_argument("--server", default="reference", help="a server name from bench_servers.py")
    p.add_argument("--seed", type=int, default=None, help="random seed (printed when chosen)")
    p.add_argument("--image-dir", default="/dev/shm", help="where raw images go; default /dev/shm")
    p.add_argument("--python", default=sys.executable, help="interpreter for the reference server")
    p.add_argument("--json", metavar="FILE", help="also save the results as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.server not in SERVERS:
        print(f"soak: unknown server {args.server!r}; known: {sorted(SERVERS)}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    region = args.region * MiB
    server_args = argparse.Namespace(
        size=args.connections * region,
        image_dir=args.image_dir,
        python=args.python,
        reference_root=REPO,
        candidate=None,
    )
    print(
        f"soak: {args.server}, {args.connections} connections x {args.region} MiB, "
        f"{args.duration:.0f} s, seed {seed}",
        flush=True,
    )
    try:
        with (
            tempfile.TemporaryDirectory(prefix="nbd-soak-") as tmp,
            running(server_args, [args.server], Path(tmp), "soak") as servers,
        ):
            server = servers[args.server]
            start = time.monotonic()
            until = start + args.duration
            workers = [Worker(i, region, seed + i) for i in range(args.connections)]
            threads = [
                threading.Thread(target=w.run, args=(server.uri, until), daemon=True)
                for w in workers
            ]
            for thread in threads:
                thread.start()
            samples: list[tuple[float, int]] = []
            while any(t.is_alive() for t in threads):
                value = rss(server)
                if value is not None:
                    samples.append((time.monotonic() - start, value))
                for thread in threads:
                    thread.join(timeout=args.sample / len(threads))
                if time.monotonic() > until + 120:
                    raise BenchError("connections still busy 120 s after the end")
            alive = server.process.poll() is None
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    ops: Counter[str] = Counter()
    errors: list[str] = []
    for w in workers:
        ops.update(w.ops)
        errors += w.errors
    summary = summarise(samples, args.duration)
    total = sum(ops.values())
    print(f"operations: {total} ({', '.join(f'{op} {ops[op]}' for op in OPS)})")
    print(f"{total / args.duration:.0f} operations/s over {args.connections} connections")
    print(f"RSS every {args.sample:g} s, {len(samples)} samples; at each step (s, MiB):")
    print("  " + "  ".join(f"{t}:{r}" for t, r in summary["points_mib"]))  # type: ignore[attr-defined]
    print(
        f"after warm-up: min {summary['min_mib_after_warmup']} MiB, "
        f"max {summary['max_mib_after_warmup']} MiB; "
        f"slope over the second half {summary['late_slope_mib_per_min']} MiB/min"
    )
    print(f"peak, including the final read-back of every region: {summary['peak_mib']} MiB")
    print(f"server still running at the end: {alive}")
    print(f"verification: {len(errors)} problem(s)")
    for error in errors[:20]:
        print(f"  {error}")
    if args.json:
        result = {"seed": seed, "ops": dict(ops), "errors": errors, "rss": samples, **summary}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average at the end {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    return 0 if not errors and alive else 1


if __name__ == "__main__":
    sys.exit(main())
