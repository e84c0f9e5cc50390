"""Generate the TLS certificates and SuperNode key pairs of a CareFL consortium.

Everything is created locally with the `cryptography` package (a Flower dependency), so
this runs on the host (`python docker/gen_certs.py`), in the one-shot `init` compose
service, or in any CareFL image (`docker run --rm ... carefl-server gen-certs ...`).
Nothing it writes is committed (.gitignore: /docker/certs/, /docker/keys/).

Layout (CERTS = public material, KEYS = private, one folder per owner so each container
mounts only its own folder):

    CERTS/ca.crt                       consortium CA (give it to every hospital)
    CERTS/superlink.crt                SuperLink server certificate (SANs: --superlink-names)
    KEYS/ca/ca.key                     CA private key (keep it offline in production)
    KEYS/superlink/superlink.key       SuperLink TLS private key
    KEYS/<hospital>/supernode.key      SuperNode authentication key (EC P-384, OpenSSH)
    KEYS/<hospital>/supernode.pub      its public key: register it with the SuperLink

Existing files are kept (re-running is safe); --force regenerates everything.

    python docker/gen_certs.py --certs docker/certs --keys docker/keys \
        --superlink-names superlink,localhost,127.0.0.1,fl.example.org \
        --hospitals st-mary,riverside,northfield

A hospital that joins a remote consortium makes only its own key pair:

    python docker/gen_certs.py --keys ./keys --hospitals my-hospital --no-tls

`--ephemeral-runtime DIR` writes a throw-away CA + localhost certificate for a container's
loopback Runtime API (SuperNode <-> ClientApp runtime); the entrypoint uses it at start-up.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
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


def make_node_keypair() -> tuple[bytes, bytes]:
    """SuperNode authentication key pair: EC P-384 in OpenSSH format (what Flower reads)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


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
        ca_k = _load_key(ca_key)
        ca_c = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        srv_crt, srv_key = certs / "superlink.crt", keys / "superlink" / "superlink.key"
        names = [n.strip() for n in args.superlink_names.split(",") if n.strip()]
        if args.force or not (srv_crt.exists() and srv_key.exists()) or _sans(srv_crt) != set(names):
            key, cert = make_server_cert(ca_k, ca_c, names)
            _write(srv_key, _key_pem(key), private=True)
            _write(srv_crt, cert.public_bytes(serialization.Encoding.PEM), private=False)
    for hospital in [h.strip() for h in args.hospitals.split(",") if h.strip()]:
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
                   help="comma-separated DNS names / IPs the SuperLink is reached by")
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
