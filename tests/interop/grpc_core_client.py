"""A gRPC client on gRPC core (Python grpcio), with stubs generated from proto/ at run time:
issues a JWT and introspects it over mutual TLS, as a client in another language would.

Environment: EPHEMERA_ADDR (host:port), EPHEMERA_CA, EPHEMERA_CERT, EPHEMERA_KEY (PEM files),
PROTO_DIR (the repository's proto/), OUT_DIR (where the stubs go), ROLE. Prints one JSON line.
"""

import json
import os
import sys

from grpc_tools import protoc

proto_dir, out_dir = os.environ["PROTO_DIR"], os.environ["OUT_DIR"]
status = protoc.main(
    [
        "protoc",
        f"-I{proto_dir}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        os.path.join(proto_dir, "ephemera", "v1", "ephemera.proto"),
    ]
)
if status != 0:
    sys.exit(f"protoc failed ({status})")
sys.path.insert(0, out_dir)

import grpc  # noqa: E402
from ephemera.v1 import ephemera_pb2 as pb  # noqa: E402
from ephemera.v1 import ephemera_pb2_grpc as rpc  # noqa: E402


def read(var):
    with open(os.environ[var], "rb") as f:
        return f.read()


credentials = grpc.ssl_channel_credentials(
    root_certificates=read("EPHEMERA_CA"),
    private_key=read("EPHEMERA_KEY"),
    certificate_chain=read("EPHEMERA_CERT"),
)
with grpc.secure_channel(os.environ["EPHEMERA_ADDR"], credentials) as channel:
    issuer = rpc.IssuerStub(channel)
    cred = issuer.Issue(pb.IssueRequest(role=os.environ["ROLE"]), timeout=10)
    seen = issuer.Introspect(pb.IntrospectRequest(token=cred.token), timeout=10)
    print(
        json.dumps(
            {
                "lease_id": cred.lease_id,
                "subject": cred.subject,
                "active": seen.active,
                "sub": seen.sub,
            }
        )
    )
