"""Docker HEALTHCHECK for the CareFL images: exit 0 when the container's service answers.

The role is the one docker/entrypoint.sh started (written to /tmp/carefl-role).

    superlink      HTTPS GET /health on its API port (chain verified against the consortium CA)
    fleet-gateway  HTTPS GET /health through the gateway, i.e. the SuperLink as hospitals see it
    app-registry   HTTPS GET /health on the registry
    supernode      HTTPS GET /health on its loopback Runtime API (ephemeral CA, see entrypoint)
    serverapp      gRPC health check of flower-superexec's loopback health service
    others         one-shot roles (init, register, launch): healthy while they run
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request
from urllib.parse import urlsplit
from pathlib import Path


def https_ok(url: str, cafile: str) -> bool:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False  # the certificate is for the service name; we dial 127.0.0.1
    with urllib.request.urlopen(url, context=ctx, timeout=4) as response:  # noqa: S310
        return response.status == 200


def grpc_ok(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=4
        )
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def main() -> int:
    role_file = Path("/tmp/carefl-role")
    role = role_file.read_text().strip() if role_file.exists() else os.environ.get("CAREFL_ROLE", "")
    try:
        if role == "superlink":
            port = os.environ.get("CAREFL_PORT", "8000")
            ok = https_ok(f"https://127.0.0.1:{port}/health",
                          os.environ.get("CAREFL_CA_CERT", "/certs/ca.crt"))
        elif role == "fleet-gateway":
            port = os.environ.get("CAREFL_GATEWAY_PORT", "8000")
            ok = https_ok(f"https://127.0.0.1:{port}/health",
                          os.environ.get("CAREFL_CA_CERT", "/certs/ca.crt"))
        elif role == "app-registry":
            url = os.environ.get("CAREFL_REGISTRY_URL", "") or "https://app-registry:8443"
            ok = https_ok(f"https://127.0.0.1:{urlsplit(url).port or 443}/health",
                          os.environ.get("CAREFL_CA_CERT", "/certs/ca.crt"))
        elif role == "supernode":
            port = os.environ.get("CAREFL_RUNTIME_PORT", "9094")
            ok = https_ok(f"https://127.0.0.1:{port}/health", "/tmp/carefl-runtime/ca.crt")
        elif role == "serverapp":
            ok = grpc_ok(os.environ.get("CAREFL_HEALTH_ADDRESS", "127.0.0.1:9098"))
        else:
            ok = True
    except Exception as err:  # noqa: BLE001 - any failure means unhealthy
        print(f"unhealthy ({role}): {err}")
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
