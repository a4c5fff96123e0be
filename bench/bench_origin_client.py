"""Which S3 client kvfast's origin tier uses, chosen by measurement: every candidate GETs the same object from the
same local SeaweedFS into one preallocated buffer, whole and as parallel ranged GETs, in one run.

    python bench/bench_origin_client.py [--mb 128] [--repeat 3]

Prints GB/s per candidate (best of ``--repeat``). Loopback to a local server is not a datacenter network: this
ranks clients by their per-byte CPU cost and GIL behaviour, not by what a real S3 link delivers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import seaweed

RANGE = 8 << 20


def boto3_whole(c, bucket, key, buf):
    body = c.get_object(Bucket=bucket, Key=key)["Body"]
    view, done = memoryview(buf), 0
    raw = body._raw_stream  # urllib3 response: readinto a preallocated buffer, no intermediate bytes
    while done < len(view):
        n = raw.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def boto3_ranged(c, bucket, key, buf, threads):
    view = memoryview(buf)

    def one(start):
        stop = min(start + RANGE, len(view))
        raw = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}")["Body"]._raw_stream
        done = start
        while done < stop:
            n = raw.readinto(view[done:stop])
            if not n:
                break
            done += n
        return done - start

    with ThreadPoolExecutor(threads) as ex:
        return sum(ex.map(one, range(0, len(view), RANGE)))


def obstore_whole(store, key, buf):
    import obstore

    done = 0
    for piece in obstore.get(store, key).stream(min_chunk_size=RANGE):
        m = memoryview(piece)
        buf[done : done + len(m)] = np.frombuffer(m, dtype=np.uint8)
        done += len(m)
    return done


def obstore_ranged(store, key, buf, threads):
    import obstore

    def one(start):
        stop = min(start + RANGE, len(buf))
        data = obstore.get_range(store, key, start=start, end=stop)
        buf[start:stop] = np.frombuffer(memoryview(data), dtype=np.uint8)
        return stop - start

    with ThreadPoolExecutor(threads) as ex:
        return sum(ex.map(one, range(0, len(buf), RANGE)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    server = seaweed.external_server() or seaweed.start_server()
    try:
        from obstore.store import S3Store

        t = server.a
        key = f"{server.new_prefix()}/blob"
        data = np.random.default_rng(0).integers(0, 256, args.mb << 20, dtype=np.uint8)
        c = server.client(t)
        c.put_object(Bucket=t.bucket, Key=key, Body=data.tobytes())
        store = S3Store(t.bucket, endpoint=server.endpoint, access_key_id=t.key, secret_access_key=t.secret,
                        region="us-east-1", client_options={"allow_http": True})
        buf = np.empty_like(data)
        cases = {
            "boto3 GET readinto": lambda: boto3_whole(c, t.bucket, key, buf),
            f"boto3 ranged x{args.threads}": lambda: boto3_ranged(c, t.bucket, key, buf, args.threads),
            "obstore GET stream": lambda: obstore_whole(store, key, buf),
            f"obstore ranged x{args.threads}": lambda: obstore_ranged(store, key, buf, args.threads),
        }
        print(f"{args.mb} MiB object, {os.cpu_count()} CPUs, best of {args.repeat}")
        for name, fn in cases.items():
            best = float("inf")
            for _ in range(args.repeat):
                buf[:] = 0
                t0 = time.perf_counter()
                n = fn()
                best = min(best, time.perf_counter() - t0)
                assert n == len(data) and np.array_equal(buf, data), name
            print(f"{name:24s} {len(data) / best / 1e9:6.2f} GB/s  ({best * 1e3:.0f} ms)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
