"""NIXL READ (or WRITE) bandwidth and latency between two processes: the KV hand-off's transport
alone.

A *target* process registers a buffer (host DRAM or a GPU) with a NIXL agent (UCX backend, as
vLLM's NixlConnector uses); an *initiator* registers its own buffer and READs the target's,
the way a decode engine pulls a prefill engine's KV blocks (``--op WRITE``: the initiator
writes into the target's buffer, the way a prefill engine pushes them). Reported per transfer
size: GB/s (10^9 bytes/s) and per-transfer latency p50/p99. Transfers are split into descriptors of
``--chunk-kib`` (vLLM reads one descriptor per layer and block: 32 KiB for Llama-3.1-8B K or V
at 16-token blocks), so the many-small-descriptor case is what is measured.

    python bench/nixl_bandwidth.py                           # host DRAM, two local processes
    python bench/nixl_bandwidth.py --device cuda --target-gpu 0 --initiator-gpu 1
    # across nodes: metadata goes over a socket (authkey-protected), data over NIXL/UCX
    python bench/nixl_bandwidth.py --role target --listen 0.0.0.0:5599 --device cuda
    python bench/nixl_bandwidth.py --role initiator --connect <target-ip>:5599 --device cuda

UCX picks its transports from the environment (UCX_TLS, UCX_NET_DEVICES; docs/GPU.md).
DESIGN.md's reference on this project's 2-core CPU host: ~5.4 GB/s for a 64 MiB READ.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AUTHKEY = os.environ.get("NIXL_BENCH_AUTHKEY", "pd-serve-nixl-bench").encode()
MIB = 1 << 20


def _address(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host or "127.0.0.1", int(port)


def _agent(name: str, progress_delay_us: int | None):
    if progress_delay_us is not None:
        from app.engine_process import patch_nixl_progress_delay

        patch_nixl_progress_delay(progress_delay_us)
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def _buffer(args, gpu: int):
    import torch

    device = f"cuda:{gpu}" if args.device == "cuda" else "cpu"
    buf = torch.empty(args.max_mib * MIB, dtype=torch.uint8, device=device)
    buf.fill_(7)
    return buf


def _descs(base: int, nbytes: int, chunk: int, device: str,
           gpu: int) -> list[tuple[int, int, int]]:
    dev = gpu if device == "cuda" else 0
    return [(base + off, min(chunk, nbytes - off), dev) for off in range(0, nbytes, chunk)]


def run_target(args, conn) -> None:
    buf = _buffer(args, args.target_gpu)
    agent = _agent("nixl-bench-target", args.progress_delay_us)
    agent.register_memory(buf)
    conn.send({"metadata": agent.get_agent_metadata(), "addr": buf.data_ptr(),
               "gpu": args.target_gpu})
    if args.op == "WRITE":
        buf.zero_()  # the initiator's bytes (7) must arrive here
    conn.recv()  # the initiator is done; keep the memory and the agent alive until then
    if args.op == "WRITE":
        conn.send(int(buf[int(max(args.sizes) * MIB) - 1].item()) == 7)


def run_initiator(args, conn) -> list[dict]:
    import torch

    buf = _buffer(args, args.initiator_gpu)
    if args.op == "READ":
        buf.zero_()
    agent = _agent("nixl-bench-initiator", args.progress_delay_us)
    agent.register_memory(buf)
    info = conn.recv()
    remote = agent.add_remote_agent(info["metadata"])
    mem = "VRAM" if args.device == "cuda" else "DRAM"
    chunk = args.chunk_kib * 1024
    results = []
    for mib in args.sizes:
        nbytes = int(mib * MIB)
        local = agent.get_xfer_descs(
            _descs(buf.data_ptr(), nbytes, chunk, args.device, args.initiator_gpu), mem)
        remote_descs = agent.get_xfer_descs(
            _descs(info["addr"], nbytes, chunk, args.device, info["gpu"]), mem)
        handle = agent.initialize_xfer(args.op, local, remote_descs, remote)
        times = []
        for i in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            state = agent.transfer(handle)
            while state == "PROC":
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise RuntimeError(f"NIXL transfer failed ({state}) at {mib} MiB")
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        agent.release_xfer_handle(handle)
        if args.device == "cuda":
            torch.cuda.synchronize(args.initiator_gpu)
        if args.op == "READ":
            assert int(buf[nbytes - 1].item()) == 7, "READ did not bring the target's bytes"
        times.sort()
        p50 = statistics.median(times)
        results.append({
            "mib": mib, "descriptors": -(-nbytes // chunk), "gbps": nbytes / p50 / 1e9,
            "p50_us": p50 * 1e6, "p99_us": times[min(len(times) - 1,
                                                     int(0.99 * len(times)))] * 1e6})
        if args.op == "READ":
            buf.zero_()
    conn.send("done")
    if args.op == "WRITE" and not conn.recv():
        raise RuntimeError("WRITE did not bring the initiator's bytes to the target")
    return results


def _target_proc(args, address):
    with Client(address, authkey=AUTHKEY) as conn:
        run_target(args, conn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=("both", "target", "initiator"), default="both")
    p.add_argument("--listen", default="127.0.0.1:0", help="target: where to wait")
    p.add_argument("--connect", help="initiator: the target's host:port")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--op", choices=("READ", "WRITE"), default="READ",
                   help="READ: pull (vLLM's NixlConnector); WRITE: push (NixlPushConnector)")
    p.add_argument("--target-gpu", type=int, default=0)
    p.add_argument("--initiator-gpu", type=int, default=1)
    p.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1, 16, 64, 256],
                   help="transfer sizes in MiB")
    p.add_argument("--chunk-kib", type=int, default=32, help="descriptor size")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--progress-delay-us", type=int, default=None,
                   help="NIXL progress-thread sleep (app's nixl.progress_delay_us); "
                   "default: NIXL's own (0, busy polling)")
    p.add_argument("--json", action="store_true", help="print JSON lines only")
    args = p.parse_args(argv)
    args.max_mib = int(max(args.sizes)) + 1

    if args.role == "target":
        with Listener(_address(args.listen), authkey=AUTHKEY) as listener:
            print(f"target waiting on {listener.address}", flush=True)
            with listener.accept() as conn:
                run_target(args, conn)
        return 0
    if args.role == "initiator":
        if not args.connect:
            p.error("--role initiator needs --connect host:port")
        with Client(_address(args.connect), authkey=AUTHKEY) as conn:
            results = run_initiator(args, conn)
    else:
        with Listener(_address(args.listen), authkey=AUTHKEY) as listener:
            proc = mp.get_context("spawn").Process(
                target=_target_proc, args=(args, listener.address))
            proc.start()
            with listener.accept() as conn:
                results = run_initiator(args, conn)
            proc.join(timeout=30)

    env = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
    if not args.json:
        print(f"NIXL {args.op} {args.device}, {args.chunk_kib} KiB descriptors, "
              f"{args.iters} iterations; UCX env: {env or 'defaults'}")
        print(f"{'MiB':>8} {'descs':>6} {'GB/s':>8} {'p50 us':>10} {'p99 us':>10}")
    for r in results:
        if args.json:
            print(json.dumps({**r, "op": args.op, "device": args.device,
                              "chunk_kib": args.chunk_kib,
                              "ucx_env": env}))
        else:
            print(f"{r['mib']:>8g} {r['descriptors']:>6} {r['gbps']:>8.2f} "
                  f"{r['p50_us']:>10.0f} {r['p99_us']:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
