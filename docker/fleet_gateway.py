"""Fleet gateway: the hospitals' only way into the SuperLink, and only to its Fleet API.

Flower 1.41's SuperLink serves its Fleet API (SuperNodes), Control API (`flwr run`, `flwr
supernode register`, ...) and Runtime API (ServerApp runtime) on ONE HTTPS listener
(`--host`/`--port`); `--control-api-address` is deprecated and no longer moves the Control
API off that listener. So the SuperLink listens only on the consortium's `control` network,
and this gateway, on both networks, passes exactly two kinds of request from the
hospitals' network to it:

    POST /v1/fleet/<method>    the Fleet API (SuperNode authentication headers unchanged)
    GET  /health               the SuperLink's health, for monitoring

Anything else (/v1/control/..., /v1/runtime/..., /docs, other methods) is answered 404 here
and never reaches the SuperLink; each refusal is logged with the caller's address.

    python fleet_gateway.py      (the `fleet-gateway` role of docker/entrypoint.sh)

Environment
    CAREFL_GATEWAY_HOST, CAREFL_GATEWAY_PORT   where to listen (default 0.0.0.0:8000)
    CAREFL_GATEWAY_CERT, CAREFL_GATEWAY_KEY    its TLS certificate and key
                                  (default /certs/fleet-gateway.crt, /keys/fleet-gateway.key)
    CAREFL_SUPERLINK           the SuperLink on the control network (default superlink:8000)
    CAREFL_CA_CERT             CA that signed the SuperLink's certificate (/certs/ca.crt)
    CAREFL_GATEWAY_MAX_BODY    largest request body passed on, bytes (default 2 GiB)

Runs on uvicorn and httpx, which Flower itself depends on.
"""

from __future__ import annotations

import logging
import os
import re
import ssl

import httpx
import uvicorn

LOG = logging.getLogger("carefl.fleet_gateway")
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]{0,63}")
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones httpx sets itself.
DROP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
        b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length"}


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "") or default


def allowed(method: str, path: str) -> bool:
    return (method == "POST" and FLEET_PATH.fullmatch(path) is not None) or (
        method == "GET" and path == "/health"
    )


class Gateway:
    """ASGI app: forward allowed requests to the SuperLink, refuse everything else."""

    def __init__(self, upstream: str, cafile: str, max_body: int) -> None:
        self.upstream = f"https://{upstream}"
        self.max_body = max_body
        self.verify = ssl.create_default_context(cafile=cafile)
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if not allowed(method, path) or scope.get("query_string"):
            client = scope.get("client") or ("?", 0)
            LOG.warning("refused %s %s from %s (only the Fleet API is served here)",
                        method, path, client[0])
            await self._answer(send, 404, b"not found: this address serves only the Fleet API\n")
            return
        body = bytearray()
        while True:
            event = await receive()
            body += event.get("body", b"")
            if len(body) > self.max_body:
                await self._answer(send, 413, b"request body too large\n")
                return
            if not event.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in DROP]
        assert self.client is not None
        request = self.client.build_request(method, self.upstream + path, headers=headers,
                                            content=bytes(body))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as err:
            LOG.error("SuperLink unreachable for %s %s: %s", method, path, err)
            await self._answer(send, 502, b"SuperLink unreachable\n")
            return
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in DROP - {b"content-length"}]
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    async def _lifespan(self, receive, send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(
                    verify=self.verify, timeout=httpx.Timeout(600.0, connect=10.0),
                    follow_redirects=False,
                )
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _answer(send, status: int, text: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", str(len(text)).encode())]})
        await send({"type": "http.response.body", "body": text})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per forwarded call
    app = Gateway(
        upstream=_env("CAREFL_SUPERLINK", "superlink:8000"),
        cafile=_env("CAREFL_CA_CERT", "/certs/ca.crt"),
        max_body=int(_env("CAREFL_GATEWAY_MAX_BODY", str(2 << 30))),
    )
    LOG.info("serving the Fleet API of %s on %s:%s", app.upstream,
             _env("CAREFL_GATEWAY_HOST", "0.0.0.0"), _env("CAREFL_GATEWAY_PORT", "8000"))
    uvicorn.run(
        app,
        host=_env("CAREFL_GATEWAY_HOST", "0.0.0.0"),
        port=int(_env("CAREFL_GATEWAY_PORT", "8000")),
        ssl_certfile=_env("CAREFL_GATEWAY_CERT", "/certs/fleet-gateway.crt"),
        ssl_keyfile=_env("CAREFL_GATEWAY_KEY", "/keys/fleet-gateway.key"),
        access_log=False,
        lifespan="on",
        log_level="info",
    )


if __name__ == "__main__":
    main()
