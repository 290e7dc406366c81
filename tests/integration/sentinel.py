"""Redis as operators run it on Kubernetes, for the failover tests: a primary,
a replica and three sentinels (``redis-server --sentinel``, the same
binary), every process on a free loopback port, with passwords on the data
nodes and on the sentinels (the pods get REDIS_PASSWORD and
REDIS_SENTINEL_PASSWORD).

The data nodes run with ``min-replicas-to-write 1``, as docs/operations.md
asks: the primary refuses writes the moment its replica is promoted, so a
forced failover cannot lose what pods wrote to the old primary while
Sentinel was still reconfiguring it. The price is that the new primary
refuses writes too until the old one is back as its replica: Sentinel waits
four "publish periods" before it reconfigures a demoted primary (8 s by
default). Timeouts are short here (a primary is down after 1 s, Sentinel's
periods a quarter of a second through SENTINEL DEBUG) so that a failover
takes a couple of seconds, not the default 10 to 30.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from tests.procs import REDIS_SERVER, RedisServer, free_port, wait_until

MASTER = "dc"
DOWN_AFTER_MS = 1000
# Passwords everywhere, as in production: the data nodes' (requirepass,
# masterauth) and the sentinels' own (requirepass), each the pods are given.
NODE_PASSWORD = "node-secret"
SENTINEL_PASSWORD = "sentinel-secret"
# Both nodes, since either may be the primary.
DATA_ARGS = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "10")


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate it signed for 127.0.0.1 and localhost:
    (CA, certificate, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(2)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / "ca.crt", directory / "redis.crt", directory / "redis.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def _replica_offset(node: RedisServer) -> int:
    return int(node.client().info("replication").get("slave_repl_offset", -1))


class SentinelGroup:
    """Two data nodes and three sentinels watching them as ``MASTER``; with
    ``tls``, every one of them speaks only TLS (replication too)."""

    def __init__(self, tls: bool = False) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="dc-sentinel-"))
        self.tls = make_tls_files(self.tmp / "tls") if tls else None
        self.nodes: list[RedisServer] = []
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._sentinels: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        primary = self._node(DATA_ARGS)
        primary.start()
        self._node((*DATA_ARGS, "--replicaof", "127.0.0.1", str(primary.port))).start()
        for i, port in enumerate(self.sentinel_ports):
            conf = self.tmp / f"sentinel{i}.conf"
            listen = f"port {port}\n"
            if self.tls:
                ca, cert, key = self.tls
                listen = (
                    f"port 0\ntls-port {port}\ntls-replication yes\ntls-auth-clients no\n"
                    f"tls-ca-cert-file {ca}\ntls-cert-file {cert}\ntls-key-file {key}\n"
                )
            conf.write_text(
                f"{listen}bind 127.0.0.1\ndir {self.tmp}\n"
                f"logfile {self.tmp}/sentinel{i}.log\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} 3000\n"
                f"sentinel auth-pass {MASTER} {NODE_PASSWORD}\n"
                f"requirepass {SENTINEL_PASSWORD}\n"
                f"sentinel sentinel-pass {SENTINEL_PASSWORD}\n"
            )
            command = [REDIS_SERVER or "redis-server", str(conf), "--sentinel"]
            self._sentinels.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for port in self.sentinel_ports:
            wait_until(lambda p=port: self._answers(p), 10, what=f"sentinel on port {port}")
            self.sentinel_for(port).execute_command(
                "SENTINEL", "DEBUG", "publish-period", 250, "info-period", 250
            )
        self.wait_healthy()

    def _node(self, args: tuple[str, ...]) -> RedisServer:
        workdir = self.tmp / f"node{len(self.nodes)}"
        node = RedisServer(workdir, args=args, password=NODE_PASSWORD, tls=self.tls)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for proc in self._sentinels:
            proc.kill()
            proc.wait(timeout=10)
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- what the pods and the checks need ------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """A pod's settings for this group (pod_factory(None, **group.env))."""
        return {
            "REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports),
            "REDIS_SENTINEL_MASTER": MASTER,
            "REDIS_PASSWORD": NODE_PASSWORD,
            "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
            **({"REDIS_TLS": "1", "REDIS_TLS_CA_FILE": str(self.tls[0])} if self.tls else {}),
        }

    def sentinel_for(self, port: int) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": str(self.tls[0])} if self.tls else {}
        return redis.Redis(
            port=port, password=SENTINEL_PASSWORD, decode_responses=True, socket_timeout=2, **tls
        )

    def _answers(self, port: int) -> bool:
        try:
            return bool(self.sentinel_for(port).ping())
        except redis.RedisError:
            return False

    def sentinel(self, i: int = 0) -> redis.Redis:
        return self.sentinel_for(self.sentinel_ports[i])

    def primary_port(self, i: int = 0) -> int:
        """The primary's port as sentinel ``i`` names it."""
        _host, port = self.sentinel(i).sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    @property
    def primary(self) -> RedisServer:
        port = self.primary_port()
        return next(node for node in self.nodes if node.port == port)

    @property
    def replica(self) -> RedisServer:
        port = self.primary_port()
        return next(node for node in self.nodes if node.port != port)

    def client(self) -> redis.Redis:
        """The primary's client: what the helpers read the truth from."""
        return self.primary.client()

    # --- faults -----------------------------------------------------------------

    def failover(self) -> None:
        """A planned failover as docs/operations.md says to run one: pause the
        primary's writes, let the replica catch up, then SENTINEL FAILOVER.
        Returns once every sentinel names the new primary.

        Without the pause, a write in flight when the replica is promoted
        (it drops what it had not yet applied) is lost after its client
        saw it streamed: a few milliseconds that a turn streaming a delta
        every 25 ms falls into now and then."""
        old = self.primary
        primary = old.client()
        # Longer than the promotion takes; writes held meanwhile then meet a
        # primary without its replica, refuse them (NOREPLICAS), and are
        # sent again by the pods to the new primary.
        primary.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
        written = primary.info("replication")["master_repl_offset"]
        wait_until(lambda: _replica_offset(self.replica) >= written, 3, what="the replica")
        self.sentinel().execute_command("SENTINEL", "FAILOVER", MASTER)
        self._wait_switched(old.port)

    def kill_primary(self) -> RedisServer:
        """kill -9 of the primary; returns once every sentinel names the new
        one. The dead node is left down: ``restart_as_replica`` brings it back."""
        old = self.primary
        old.stop()
        self._wait_switched(old.port)
        return old

    def restart_as_replica(self, node: RedisServer) -> None:
        """The killed node back as the new primary's replica, as a Kubernetes
        pod restarts and asks the sentinels whom to follow."""
        node.args = (*DATA_ARGS, "--replicaof", "127.0.0.1", str(self.primary_port()))
        node.start()
        self.wait_healthy()

    def _wait_switched(self, old: int) -> None:
        # Usually a second or two; but an election that fails (two sentinels
        # asking for votes at once, or a slow one on a loaded machine) is
        # tried again only after twice the failover timeout: allow a few.
        for i in range(len(self.sentinel_ports)):
            wait_until(
                lambda i=i: self.primary_port(i) != old,
                45,
                what=f"sentinel {i} to name a new primary",
            )

    def wait_healthy(self) -> None:
        """Every sentinel names the same primary, which has its replica in
        sync and would accept writes, and which the sentinels know replicated."""

        def healthy() -> bool:
            try:
                ports = {self.primary_port(i) for i in range(len(self.sentinel_ports))}
                if len(ports) != 1:
                    return False
                port = ports.pop()
                primary = next(node for node in self.nodes if node.port == port)
                info = primary.client().info("replication")
                return bool(
                    info["role"] == "master"
                    and info.get("min_slaves_good_slaves", 0) >= 1
                    and len(self.sentinel().sentinel_slaves(MASTER)) >= 1
                )
            except (redis.RedisError, StopIteration):
                return False

        wait_until(healthy, 30, interval=0.1, what="the sentinel group to be healthy")
