"""TLS for clients, mutual TLS between coordinator and workers, bearer tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import chorus
from chorus.v1 import worker_pb2, worker_pb2_grpc
from chorus_local.cluster import WorkerProcess, spawn_worker, start_coordinator
from coordinator.config import ModelSpec
from tests.certs import issue, make_ca
from tests.cluster_helpers import MODELS, LoopThread, make_config

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory)
    return {
        "ca": ca,
        # Valid for the service name only, as one certificate shared by worker pods dialled by IP.
        "worker": issue(ca, "worker", server=True, dns=("chorus-worker",), ip=False),
        "coordinator-server": issue(ca, "coordinator-server", server=True),
        "coordinator-client": issue(ca, "coordinator-client", server=False),
        "stranger": issue(make_ca(directory, "other-ca"), "stranger", server=False),
    }


@pytest.fixture(scope="module")
def mtls_worker(pki: dict[str, Path]) -> Iterator[WorkerProcess]:
    w = pki["worker"]
    tls = {"tls_cert": w.with_suffix(".crt"), "tls_key": w.with_suffix(".key"), "tls_ca": pki["ca"].with_suffix(".crt")}
    worker = spawn_worker(ModelSpec(name="arith-bpe", path=str(MODELS / "arith-bpe")), threads=1, options=tls)
    yield worker
    worker.stop()


def _credentials(ca: Path, client: Path | None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(ca.with_suffix(".crt").read_bytes())
    return grpc.ssl_channel_credentials(
        ca.with_suffix(".crt").read_bytes(),
        client.with_suffix(".key").read_bytes(),
        client.with_suffix(".crt").read_bytes(),
    )


def _info(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    options = [("grpc.ssl_target_name_override", "chorus-worker")]
    channel = grpc.secure_channel(address, credentials, options) if credentials else grpc.insecure_channel(address)
    with channel:
        return worker_pb2_grpc.ModelWorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5).name


def test_a_worker_with_mutual_tls_refuses_clients_without_the_clusters_certificate(
    pki: dict[str, Path], mtls_worker: WorkerProcess
) -> None:
    assert _info(mtls_worker.address, _credentials(pki["ca"], pki["coordinator-client"])) == "arith-bpe"
    for credentials in (None, _credentials(pki["ca"], None), _credentials(pki["ca"], pki["stranger"])):
        with pytest.raises(grpc.RpcError) as caught:
            _info(mtls_worker.address, credentials)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no call reaches it


def test_tls_and_bearer_tokens_end_to_end(
    loop: LoopThread, pki: dict[str, Path], mtls_worker: WorkerProcess, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# clients\n{TOKEN}\nanother-token\n")
    server, client_cert, ca = pki["coordinator-server"], pki["coordinator-client"], pki["ca"].with_suffix(".crt")
    config = make_config(
        [mtls_worker],
        server={
            "port": 0,
            "tls_cert": str(server.with_suffix(".crt")),
            "tls_key": str(server.with_suffix(".key")),
            "tokens_file": str(tokens),
        },
        worker_tls={
            "ca": str(ca),
            "cert": str(client_cert.with_suffix(".crt")),
            "key": str(client_cert.with_suffix(".key")),
            "server_name": "chorus-worker",
        },
    )
    running = loop.run(start_coordinator(config, [mtls_worker.address], port=0))
    target = f"127.0.0.1:{running.port}"
    try:
        with chorus.Client(target, timeout=30, token=TOKEN, tls_ca=str(ca)) as client:
            assert client.generate(prompt="48+27=", max_new_tokens=4).text == "75"
        for token in (None, "wrong-token", TOKEN[:-1]):
            with chorus.Client(target, timeout=30, token=token, tls_ca=str(ca)) as client:
                with pytest.raises(chorus.Unauthenticated):
                    client.generate(prompt="48+27=", max_new_tokens=4)
                with pytest.raises(chorus.Unauthenticated):
                    client.models()
        with chorus.Client(target, timeout=30, token=TOKEN) as plaintext, pytest.raises(chorus.Unavailable):
            plaintext.generate(prompt="48+27=", max_new_tokens=4)  # TLS only
        # Kubernetes probes call health without a token.
        with grpc.secure_channel(target, _credentials(pki["ca"], None)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        loop.run(running.stop(grace=0))
