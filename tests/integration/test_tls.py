"""TLS and mutual TLS with certificates made at test time by openssl: secure clients pass; a
plaintext client, a client without a certificate and a client with a certificate from another
CA (mutual TLS) fail."""

import grpc
import numpy as np
import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb
from arcface.v1 import face_embedding_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    f = lib.make_pki(str(tmp_path_factory.mktemp("pki")))
    root = lib.read_bytes(f["ca"])
    return dict(f, **{
        "client": {"root": root, "cert": lib.read_bytes(f["client_cert"]),
                   "key": lib.read_bytes(f["client_key"])},
        "rogue": {"root": root, "cert": lib.read_bytes(f["rogue_cert"]),
                  "key": lib.read_bytes(f["rogue_key"])},
        "anonymous": {"root": root},
        "wrong_root": {"root": lib.read_bytes(f["other"])},
    })


def model_info(server, tls):
    channel = server.make_channel(tls=tls)
    try:
        return pb_grpc.FaceEmbeddingStub(channel).GetModelInfo(pb.GetModelInfoRequest(),
                                                               timeout=10)
    finally:
        channel.close()


def refused(server, tls):
    with pytest.raises(grpc.RpcError) as err:
        model_info(server, tls)
    return err.value.code()


def test_tls(start_server, pki):
    server = start_server(lib.demo_args("--tls-cert", pki["server_cert"],
                                        "--tls-key", pki["server_key"]),
                          name="tls", tls=pki["anonymous"])
    info = model_info(server, pki["anonymous"])
    assert info.demo_weights is True
    # A client certificate is not required, but allowed.
    assert model_info(server, pki["client"]).model_id == info.model_id
    # The server's identity is checked: a client trusting another CA fails.
    assert refused(server, pki["wrong_root"]) == grpc.StatusCode.UNAVAILABLE
    # Plaintext against the TLS port fails.
    assert refused(server, None) == grpc.StatusCode.UNAVAILABLE
    # And an embedding travels over TLS.
    resp = server.embed([lib.raw_face(np.full((lib.CROP, lib.CROP, 3), 128, np.uint8))])
    assert len(resp.embeddings) == 1


def test_mutual_tls(start_server, pki):
    server = start_server(lib.demo_args("--tls-cert", pki["server_cert"],
                                        "--tls-key", pki["server_key"],
                                        "--tls-client-ca", pki["ca"]),
                          name="mtls", tls=pki["client"])
    assert model_info(server, pki["client"]).demo_weights is True
    assert refused(server, pki["anonymous"]) == grpc.StatusCode.UNAVAILABLE
    assert refused(server, pki["rogue"]) == grpc.StatusCode.UNAVAILABLE
    assert refused(server, None) == grpc.StatusCode.UNAVAILABLE
