"""A local S3-compatible server (moto's server mode) on loopback, for the S3 tests."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_endpoint(bucket: str) -> Iterator[str]:
    """Start a moto server on a free loopback port with ``bucket`` created; yield its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


def s3_options(endpoint: str) -> dict:
    """fsspec options for that server; skip_instance_cache: a fresh client per open_storage, as
    separate processes would have."""
    return {"key": "test", "secret": "test", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
