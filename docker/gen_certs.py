"""Generate the TLS certificates and SuperNode key pairs of a CareFL consortium.

Everything is created locally with the `cryptography` package (a Flower dependency), so
this runs on the host (`python docker/gen_certs.py`), in the one-shot `init` compose
service, or in any CareFL image (`docker run --rm ... carefl-server gen-certs ...`).
Nothing it writes is committed (.gitignore: /docker/certs/, /docker/keys/).

Layout (CERTS = public material, KEYS = private, one folder per owner so each container
mounts only its own folder):

    CERTS/ca.crt                       consortium CA (give it to every hospital)
    CERTS/superlink.crt                SuperLink certificate, control network only
                                       (SANs: --superlink-names)
    CERTS/fleet-gateway.crt            the Fleet gateway hospitals dial (SANs: --gateway-names;
                                       add the public name for remote hospitals)
    CERTS/app-registry.crt             the consortium app registry (SANs: --registry-names)
    CERTS/trusted-entities.yaml        the consortium's app-signing public key, in the format of
                                       `flower-supernode --trusted-entities` (give it to every
                                       hospital with ca.crt)
    CERTS/supernodes/<hospital>.pub    (copied there by the init service for `register`)
    KEYS/ca/ca.key                     CA private key (keep it offline in production)
    KEYS/superlink/superlink.key       SuperLink TLS private key
    KEYS/superlink/superexec.secret    SuperExec shared secret (SuperLink side)
    KEYS/serverapp/superexec.secret    the same secret for the ServerApp runtime
    KEYS/fleet-gateway/fleet-gateway.key, KEYS/app-registry/app-registry.key   their TLS keys
    KEYS/launcher/app-signing.key      Ed25519 key that signs app bundles (FABs); the public
                                       half is CERTS/trusted-entities.yaml
    KEYS/<hospital>/supernode.key      SuperNode authentication key (EC P-384, OpenSSH)
    KEYS/<hospital>/supernode.pub      its public key: register it with the SuperLink

Existing files are kept (re-running is safe; a certificate whose names changed is
re-issued); --force regenerates everything.

    python docker/gen_certs.py --certs docker/certs --keys docker/keys \
        --gateway-names fleet-gateway,fl.example.org \
        --hospitals st-mary,riverside,northfield

A hospital that joins a remote consortium makes only its own key pair:

    python docker/gen_certs.py --keys ./keys --hospitals my-hospital --no-tls

`--ephemeral-runtime DIR` writes a throw-away CA + localhost certificate for a container's
loopback Runtime API (SuperNode <-> ClientApp runtime); the entrypoint uses it at start-up.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825  # the longest lifetime browsers/TLS stacks accept for a leaf cert


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    print(f"gen_certs: wrote {path}")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey), path
    return key


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (EC P-384) that signs the server certificates."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: list[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate valid for every name/IP in `names` (first one = CN)."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _openssh_pair(key) -> tuple[bytes, bytes]:
    """(private key, public key) of ``key`` in OpenSSH format, the private one unencrypted."""
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public


def make_node_keypair() -> tuple[bytes, bytes]:
    """SuperNode authentication key pair: EC P-384 in OpenSSH format (what Flower reads)."""
    private, public = _openssh_pair(ec.generate_private_key(ec.SECP384R1()))
    return private, public + b"\n"


def make_signing_keypair() -> tuple[bytes, bytes]:
    """App-signing key pair: Ed25519 in OpenSSH format, the only kind Flower's
    `--trusted-entities` accepts."""
    return _openssh_pair(ed25519.Ed25519PrivateKey.generate())


def signing_key_id(public_openssh: bytes) -> str:
    """The id under which a signing key is listed in trusted-entities.yaml and named in a
    FAB's verifications: fpk_ + the first 32 hex digits of SHA-256 of the public key."""
    blob = public_openssh.split()[1]
    return "fpk_" + hashlib.sha256(blob).hexdigest()[:32]


def trusted_entities_yaml(public_openssh: bytes, comment: str) -> bytes:
    """`flower-supernode --trusted-entities` file listing one Ed25519 public key."""
    key = public_openssh.decode().split()
    line = f'{signing_key_id(public_openssh)}: "{key[0]} {key[1]} {comment}"\n'
    return ("# Public keys whose signature on an app bundle (FAB) this hospital accepts.\n"
            + line).encode()


def _names(csv: str) -> list[str]:
    return [n.strip() for n in csv.split(",") if n.strip()]


def _leaf(certs: Path, keys: Path, name: str, names: list[str],
          ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], force: bool) -> None:
    """CERTS/<name>.crt + KEYS/<name>/<name>.key for `names`; re-issued when they change."""
    crt, key_path = certs / f"{name}.crt", keys / name / f"{name}.key"
    if force or not (crt.exists() and key_path.exists()) or _sans(crt) != set(names):
        key, cert = make_server_cert(ca[0], ca[1], names)
        _write(key_path, _key_pem(key), private=True)
        _write(crt, cert.public_bytes(serialization.Encoding.PEM), private=False)


def consortium(args: argparse.Namespace) -> None:
    certs, keys = args.certs, args.keys
    if not args.no_tls:
        if certs is None:
            sys.exit("gen_certs: --certs is required unless --no-tls")
        ca_crt, ca_key = certs / "ca.crt", keys / "ca" / "ca.key"
        if args.force or not (ca_crt.exists() and ca_key.exists()):
            key, cert = make_ca(args.ca_name)
            _write(ca_key, _key_pem(key), private=True)
            _write(ca_crt, cert.public_bytes(serialization.Encoding.PEM), private=False)
            args.force = True  # a new CA invalidates every certificate it signed
        ca = (_load_key(ca_key), x509.load_pem_x509_certificate(ca_crt.read_bytes()))
        _leaf(certs, keys, "superlink", _names(args.superlink_names), ca, args.force)
        _leaf(certs, keys, "fleet-gateway", _names(args.gateway_names), ca, args.force)
        _leaf(certs, keys, "app-registry", _names(args.registry_names), ca, args.force)
        # The consortium's app-signing key: SuperNodes run only FABs it signed.
        sign_key, trusted = keys / "launcher" / "app-signing.key", certs / "trusted-entities.yaml"
        if args.force or not (sign_key.exists() and trusted.exists()):
            private, public = make_signing_keypair()
            _write(sign_key, private, private=True)
            _write(trusted, trusted_entities_yaml(public, "carefl-consortium"), private=False)
        # SuperExec shared secret: one value, one copy per process that holds it.
        link_secret = keys / "superlink" / "superexec.secret"
        if args.force or not link_secret.exists():
            _write(link_secret, secrets.token_hex(32).encode(), private=True)
        app_secret = keys / "serverapp" / "superexec.secret"
        if not app_secret.exists() or app_secret.read_bytes() != link_secret.read_bytes():
            _write(app_secret, link_secret.read_bytes(), private=True)
    for hospital in _names(args.hospitals):
        priv, pub = keys / hospital / "supernode.key", keys / hospital / "supernode.pub"
        if args.force or not (priv.exists() and pub.exists()):
            private, public = make_node_keypair()
            _write(priv, private, private=True)
            _write(pub, public, private=False)


def _sans(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def ephemeral_runtime(directory: Path) -> None:
    """Throw-away CA + certificate for a loopback Runtime API (never leaves the container)."""
    ca_key, ca_cert = make_ca("carefl-runtime-ephemeral-ca")
    key, cert = make_server_cert(ca_key, ca_cert, ["localhost", "127.0.0.1"])
    _write(directory / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), False)
    _write(directory / "runtime.crt", cert.public_bytes(serialization.Encoding.PEM), False)
    _write(directory / "runtime.key", _key_pem(key), private=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--certs", type=Path, help="folder for public certificates")
    p.add_argument("--keys", type=Path, help="folder for private keys (one sub-folder per owner)")
    p.add_argument("--superlink-names", default="superlink,localhost,127.0.0.1",
                   help="comma-separated DNS names / IPs of the SuperLink (control network)")
    p.add_argument("--gateway-names", default="fleet-gateway,localhost,127.0.0.1",
                   help="comma-separated DNS names / IPs hospitals dial (the Fleet gateway)")
    p.add_argument("--registry-names", default="app-registry",
                   help="comma-separated DNS names / IPs of the app registry")
    p.add_argument("--hospitals", default="", help="comma-separated hospital names")
    p.add_argument("--ca-name", default="CareFL consortium CA")
    p.add_argument("--no-tls", action="store_true", help="only SuperNode key pairs")
    p.add_argument("--force", action="store_true", help="regenerate existing files")
    p.add_argument("--ephemeral-runtime", type=Path, metavar="DIR",
                   help="write a throw-away loopback Runtime API CA/cert/key into DIR and exit")
    args = p.parse_args(argv)
    if args.ephemeral_runtime:
        ephemeral_runtime(args.ephemeral_runtime)
        return
    if args.keys is None:
        p.error("--keys is required")
    consortium(args)


if __name__ == "__main__":
    main()
