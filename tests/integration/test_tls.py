"""Mutual TLS between router and expert services: only a caller with a certificate the service trusts gets in."""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from moe_core.pb import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
from moe_core.placement import ShardSpec
from moe_core.rpc import Tls
from router_service.data_link import DataLink
from router_service.replica import ReplicaError
from tests.integration.services import Cluster


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, ca: bool = False, dns: str | None = None):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(folder: Path, name: str, cert, key) -> tuple[str, str]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for `experts.moe.test`, a router client certificate; and an outsider's."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("moe-serve test CA", ca_key, ca=True)
    files = {"ca": _write(folder, "ca", ca, ca_key)[0]}
    server_key, client_key = _key(), _key()
    files["server"] = _write(folder, "server", _cert("experts", server_key, ca, ca_key, dns="experts.moe.test"),
                             server_key)
    files["client"] = _write(folder, "client", _cert("router", client_key, ca, ca_key), client_key)
    rogue_ca_key, rogue_key = _key(), _key()
    rogue_ca = _cert("rogue CA", rogue_ca_key, ca=True)
    files["rogue"] = _write(folder, "rogue", _cert("intruder", rogue_key, rogue_ca, rogue_ca_key), rogue_key)
    return files


def _describe(port: int, credentials) -> expert_pb2.ShardInfo:
    options = [("grpc.ssl_target_name_override", "experts.moe.test")]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        return expert_pb2_grpc.ExpertServiceStub(channel).Describe(expert_pb2.DescribeRequest(), timeout=10)


def test_only_a_certified_router_reaches_the_experts(tiny_checkpoint, tmp_path, pki):
    path = tiny_checkpoint("mixtral-gqa2-top2")
    cluster = Cluster(tmp_path)
    try:
        spec = ShardSpec("shard-0", [(layer, e) for layer in range(3) for e in range(4)])
        cluster.placement([spec])
        expert = cluster.expert(path, spec, 0, extra=["--tls-cert", pki["server"][0], "--tls-key", pki["server"][1],
                                                      "--tls-client-ca", pki["ca"]])
        cluster.wait(expert)
        ca = Path(pki["ca"]).read_bytes()

        def creds(pair=None):
            if pair is None:
                return grpc.ssl_channel_credentials(root_certificates=ca)
            return grpc.ssl_channel_credentials(ca, Path(pair[1]).read_bytes(), Path(pair[0]).read_bytes())

        assert _describe(expert.port, creds(pki["client"])).shard_id == "shard-0"
        for outsider in (None, pki["rogue"]):  # no client certificate, or one from another CA
            with pytest.raises(grpc.RpcError) as info:
                _describe(expert.port, creds(outsider))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError), grpc.insecure_channel(f"127.0.0.1:{expert.port}") as plain:
            expert_pb2_grpc.ExpertServiceStub(plain).Describe(expert_pb2.DescribeRequest(), timeout=10)

        # The data plane takes the same certificates: a certified router's link works, outsiders' fail.
        data_port = _describe(expert.port, creds(pki["client"])).data_port
        certified = Tls(cert=pki["client"][0], key=pki["client"][1], ca=pki["ca"], server_name="experts.moe.test")
        link = DataLink("127.0.0.1", data_port, 10, certified)
        link.send(expert_pb2.ExpertRequest(step_id=1, model_revision="0000"))
        assert link.receive(1).error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]  # answered, over TLS
        link.close()
        rogue = Tls(cert=pki["rogue"][0], key=pki["rogue"][1], ca=pki["ca"], server_name="experts.moe.test")
        for outsider in (None, Tls(ca=pki["ca"], server_name="experts.moe.test"), rogue):
            link = DataLink("127.0.0.1", data_port, 10, outsider)
            with pytest.raises(ReplicaError):
                link.send(expert_pb2.ExpertRequest(step_id=2, model_revision="0000"))
                link.receive(2)
            link.close()

        router = cluster.router(path, {"shard-0": [expert]}, "--expert-tls-ca", pki["ca"], "--expert-tls-cert",
                                pki["client"][0], "--expert-tls-key", pki["client"][1], "--expert-tls-server-name",
                                "experts.moe.test")
        cluster.wait(router)
        with grpc.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            chunks = list(router_pb2_grpc.RouterServiceStub(channel).Generate(router_pb2.GenerateRequest(
                prompt_ids=[5, 6, 7], sampling=router_pb2.SamplingParams(max_tokens=4, ignore_eos=True))))
        assert chunks[-1].finished and chunks[-1].completion_tokens == 4
    finally:
        cluster.stop()
