"""The consortium's app registry: signed Flower App Bundles (FABs) for the SuperLink.

Flower 1.41 SuperNodes started with `--trusted-entities <yaml>` run a run's app bundle only
if it carries a valid Ed25519 signature by one of the listed keys. In Flower 1.41 the ONLY
way a signature reaches a SuperNode is through the SuperLink fetching the app from "Flower
Hub" (`flwr run @publisher/app==x.y.z`): the SuperLink POSTs to
$FLWR_SUPERGRID_API_URL/hub/fetch-fab, downloads the FAB from the URL it gets back and
hands the FAB, with the signatures from that answer, to every SuperNode. A FAB submitted
from a folder (`flwr run ./app`) never carries one, so a SuperNode with trusted entities
refuses it ("App verification is not supported by the connected SuperLink").

This module is that endpoint for an air-gapped consortium, plus the signing step:

    python app_registry.py publish [APP_DIR]   `flwr build` APP_DIR (default $CAREFL_APP or
                                               /app), sign the FAB with the consortium's
                                               key, store both in $CAREFL_APPS_DIR; prints
                                               the app spec to run, e.g. @carefl/carefl==0.1.0
    python app_registry.py serve               HTTPS: POST /v1/hub/fetch-fab,
                                               GET /v1/fabs/<sha256>.fab, GET /health

The signature is exactly what `flwr app review` makes for Flower Hub (Flower's own
`create_message_to_sign(sha256(fab), signed_at)` signed with Ed25519) and is checked by
the SuperNode, not here: the registry holds only public material, and a registry (or a
SuperLink) that serves a FAB nobody trusted signed gets it refused by every hospital.

Environment
    CAREFL_APPS_DIR          signed FABs and their signatures (default /apps)
    CAREFL_SIGNING_KEY       Ed25519 OpenSSH private key used by `publish`
                             (default /keys/app-signing.key)
    CAREFL_REGISTRY_URL      this registry's address as the SuperLink reaches it
                             (default https://app-registry:8443)
    CAREFL_REGISTRY_CERT, CAREFL_REGISTRY_KEY   its TLS certificate and key
                             (default /certs/app-registry.crt, /keys/app-registry.key)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_certs import signing_key_id  # noqa: E402  (sits next to this file)

# Flower's own app-id / version patterns (flwr.supercore.constant), plus: no leading dot.
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
VERSION = re.compile(r"\d+\.\d+\.\d+")
FAB_FILE = re.compile(r"/v1/fabs/([0-9a-f]{64})\.fab")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "") or default


def _entry(apps: Path, app_id: str, version: str) -> Path | None:
    """apps/<publisher>/<name>/<version>.json for app_id '@publisher/name', or None."""
    publisher, _, name = app_id.removeprefix("@").partition("/")
    if not (app_id.startswith("@") and NAME.fullmatch(publisher) and NAME.fullmatch(name)
            and VERSION.fullmatch(version)):
        return None
    return apps / publisher / name / f"{version}.json"


def publish(app_dir: Path, key_path: Path, apps: Path) -> str:
    """Build, sign and store the app in `app_dir`; return its app spec."""
    from flwr.common.config import get_fab_config, get_metadata_from_config
    from flwr.supercore.primitives.asymmetric_ed25519 import (
        create_message_to_sign,
        load_private_key,
        sign_message,
    )
    from cryptography.hazmat.primitives import serialization

    with tempfile.TemporaryDirectory(prefix="carefl-fab-") as tmp:
        # `flwr build` may rewrite the app's pyproject.toml: build a copy.
        app = Path(tmp) / "app"
        shutil.copytree(app_dir, app, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git"))
        out = Path(tmp) / "out"
        out.mkdir()
        subprocess.run(["flwr", "build", "--app", str(app)], cwd=out, check=True,
                       stdout=subprocess.DEVNULL)
        fab = next(out.glob("*.fab")).read_bytes()
    fab_id, version = get_metadata_from_config(get_fab_config(fab))
    key = load_private_key(key_path)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    signed_at = int(time.time())
    digest = hashlib.sha256(fab).digest()
    signature = sign_message(key, create_message_to_sign(digest, signed_at))
    entry = _entry(apps, f"@{fab_id}", version)
    if entry is None:
        sys.exit(f"app_registry: app id @{fab_id} / version {version} not publishable")
    (apps / f"{digest.hex()}.fab").write_bytes(fab)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp_entry = entry.with_suffix(".tmp")
    tmp_entry.write_text(json.dumps({
        "fab_sha256": digest.hex(),
        "verifications": [{
            "public_key_id": signing_key_id(public),
            "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
            "signed_at": signed_at,
        }],
    }, indent=1))
    tmp_entry.replace(entry)
    spec = f"@{fab_id}=={version}"
    print(f"app_registry: published {spec} (FAB sha256 {digest.hex()[:12]}, signed by "
          f"{signing_key_id(public)})", flush=True)
    return spec


class Registry(BaseHTTPRequestHandler):
    apps: Path
    base_url: str
    server_version = "carefl-app-registry"

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _detail(self, status: int, detail: str) -> None:
        self._send(status, json.dumps({"detail": detail}).encode())

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != "/v1/hub/fetch-fab":
            self._detail(404, "not found")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            request = json.loads(self.rfile.read(min(length, 65536)))
            app_id, version = str(request["app_id"]), request.get("app_version")
        except (ValueError, KeyError, TypeError):
            self._detail(400, "expected JSON with app_id and app_version")
            return
        if not version:
            self._detail(404, f"{app_id}: give an exact version (@publisher/app==x.y.z)")
            return
        entry = _entry(self.apps, app_id, str(version))
        if entry is None or not entry.is_file():
            self._detail(404, f"{app_id}=={version} is not published in this registry")
            return
        record = json.loads(entry.read_text())
        answer = {"fab_url": f"{self.base_url}/v1/fabs/{record['fab_sha256']}.fab",
                  "verifications": record["verifications"]}
        self._send(200, json.dumps(answer).encode())

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/health":
            self._send(200, b"ok\n", "text/plain")
            return
        match = FAB_FILE.fullmatch(self.path)
        fab = self.apps / f"{match.group(1)}.fab" if match else None
        if fab is None or not fab.is_file():
            self._detail(404, "not found")
            return
        self._send(200, fab.read_bytes(), "application/octet-stream")

    def log_message(self, fmt: str, *args) -> None:  # one line per request, to stdout
        print(f"app_registry: {self.address_string()} {fmt % args}", flush=True)


def serve() -> None:
    apps = Path(_env("CAREFL_APPS_DIR", "/apps"))
    base_url = _env("CAREFL_REGISTRY_URL", "https://app-registry:8443").rstrip("/")
    port = urlsplit(base_url).port or 443
    Registry.apps, Registry.base_url = apps, base_url
    httpd = ThreadingHTTPServer(("0.0.0.0", port), Registry)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(_env("CAREFL_REGISTRY_CERT", "/certs/app-registry.crt"),
                        _env("CAREFL_REGISTRY_KEY", "/keys/app-registry.key"))
    httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    print(f"app_registry: serving {apps} as {base_url}", flush=True)
    httpd.serve_forever()


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "serve":
        serve()
    elif command == "publish":
        app_dir = sys.argv[2] if len(sys.argv) > 2 else _env("CAREFL_APP", "/app")
        publish(Path(app_dir), Path(_env("CAREFL_SIGNING_KEY", "/keys/app-signing.key")),
                Path(_env("CAREFL_APPS_DIR", "/apps")))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
