"""Credentials for a deployment: a CA, the SuperLink's TLS certificate, the SuperNodes' key pairs.

Why: a hospital's SuperNode must know it talks to the real SuperLink (TLS: the SuperLink's certificate,
signed by a CA every hospital holds), and the SuperLink must know which SuperNodes may join (node
authentication: each SuperNode signs its requests with its own EC key; the SuperLink accepts only
public keys its admin registered with ``flwr supernode register``). Everything is generated with the
``cryptography`` package, the same kinds of keys as Flower's examples/supernode-authentication:
node keys are EC P-384 in OpenSSH format (what ``flower-supernode --auth-supernode-private-key``
parses). The CA and the server key are EC P-384 too (as strong as RSA-7680, generated in
milliseconds).

Who runs what (``fedmeld keys --help``)::

    fedmeld keys ca DIR                       # server admin, once: ca.pem (public) + ca.key (secret)
    fedmeld keys server DIR --host NAME ...   # server admin: server.pem + server.key, signed by DIR's CA
    fedmeld keys node DIR --name hospital-a   # each hospital: hospital-a.key (stays) + hospital-a.pub (travels)
    fedmeld keys secret FILE                  # each site with a fedmeld executor: the SuperExec secret

Every file is written atomically (a temporary file, then a hard link, which never replaces an
existing file), private keys with mode 0600; nothing is ever overwritten.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
SUPEREXEC_SECRET = "superexec.secret"
LOOPBACK = ("localhost", "127.0.0.1", "::1")  # always in the server certificate: local tools and tests
CURVE = ec.SECP384R1
PRIVATE, PUBLIC = 0o600, 0o644


class CredentialError(RuntimeError):
    """A credential file is missing, exists already, or is not what it should be."""


def node_key_paths(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's private and public key files: ``NAME.key`` stays at the hospital, ``NAME.pub`` travels."""
    return folder / f"{name}.key", folder / f"{name}.pub"


def write_new(files: dict[Path, tuple[bytes, int]]) -> None:
    """Write every file (path -> (content, mode)) or none: refuse if any exists, then publish each
    one atomically (written and fsynced under a temporary name, then hard-linked into place: a
    link never replaces an existing file, so a concurrent writer cannot be overwritten either)."""
    for path in files:
        if path.exists():
            raise CredentialError(f"{path} exists already; fedmeld never overwrites credentials: move it "
                                  f"away (e.g. to {path.name}.old) or write into another folder")
    for path, (content, mode) in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600 from the start
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise CredentialError(f"{path} appeared while it was being written; nothing was overwritten") from None
        finally:
            os.unlink(tmp)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmeld federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 issuer_key: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    """The fields every certificate here shares; the caller adds what makes it a CA or a server."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a little clock skew between sites
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                           critical=False))


def create_ca(folder: Path, days: int = 3650) -> tuple[Path, Path]:
    """The federation's certificate authority: ``ca.pem`` goes to every hospital (it lets a SuperNode
    recognise the SuperLink), ``ca.key`` signs server certificates and should stay offline."""
    key = ec.generate_private_key(CURVE())
    name = _name("fedmeld federation CA")
    cert = (_certificate(name, key, name, key, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    write_new({cert_path: (cert.public_bytes(serialization.Encoding.PEM), PUBLIC), key_path: (_pem_key(key), PRIVATE)})
    return cert_path, key_path


def load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA that ``create_ca`` wrote into ``folder``, to sign with."""
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise CredentialError(f"{path} not found: create the CA first with `fedmeld keys ca {folder}`")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.public_key() != key.public_key():
        raise CredentialError(f"{key_path} is not the key of {cert_path}: keep the pair that `fedmeld keys ca` wrote")
    return cert, key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def create_server_certificate(folder: Path, hosts: Sequence[str] = (), days: int = 825) -> tuple[Path, Path]:
    """The SuperLink's certificate and key, signed by the CA in ``folder``, valid for ``hosts`` (the
    names and addresses hospitals dial) plus loopback. A SuperNode refuses a SuperLink whose
    certificate does not name the address it dialled."""
    ca_cert, ca_key = load_ca(folder)
    names = list(dict.fromkeys([*hosts, *LOOPBACK]))
    key = ec.generate_private_key(CURVE())
    cert = (_certificate(_name(names[0]), key, ca_cert.subject, ca_key, days)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    cert_path, key_path = folder / SERVER_CERT, folder / SERVER_KEY
    write_new({cert_path: (cert.public_bytes(serialization.Encoding.PEM), PUBLIC), key_path: (_pem_key(key), PRIVATE)})
    return cert_path, key_path


def create_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """One SuperNode's identity: an EC P-384 key pair in OpenSSH format. The private key never leaves
    the hospital; the admin registers the public key (``flwr supernode register NAME.pub``)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())  # flower-supernode reads it without a passphrase
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private_path, public_path = node_key_paths(folder, name)
    write_new({private_path: (private, PRIVATE), public_path: (public + f" {name}\n".encode(), PUBLIC)})
    return private_path, public_path


def create_secret(path: Path) -> Path:
    """A SuperExec shared secret (32 random bytes, mode 0600): the SuperNode (or SuperLink) and the one
    executor allowed to claim its tasks both read it; a process on the same host without it cannot."""
    write_new({path: (secrets.token_hex(32).encode(), PRIVATE)})
    return path


@dataclass(frozen=True)
class Credentials:
    """Everything a one-machine secure deployment needs, by path (as Flower's flags take them)."""

    ca: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys, one per SuperNode; each public key lies beside it (.pub)


def local_node_name(index: int) -> str:
    """The key name of SuperNode ``index`` in a ``fedmeld deploy --certs`` folder."""
    return f"supernode-{index}"


def create_local_credentials(folder: Path, num_nodes: int) -> Credentials:
    """A fresh CA, a loopback server certificate and one key pair per SuperNode, for ``fedmeld deploy``."""
    create_ca(folder)
    create_server_certificate(folder)
    for i in range(num_nodes):
        create_node_keys(folder, local_node_name(i))
    return load_local_credentials(folder, num_nodes)


def load_local_credentials(folder: Path, num_nodes: int) -> Credentials:
    """The credentials ``fedmeld deploy --certs DIR`` takes from a folder that ``fedmeld keys`` filled;
    a missing file is named with the command that creates it. Paths come back absolute (Flower's
    processes run elsewhere)."""
    folder = folder.resolve()
    creates = {folder / CA_CERT: f"fedmeld keys ca {folder}",
               folder / SERVER_CERT: f"fedmeld keys server {folder}",
               folder / SERVER_KEY: f"fedmeld keys server {folder}"}
    for i in range(num_nodes):
        name = local_node_name(i)
        for path in node_key_paths(folder, name):
            creates[path] = f"fedmeld keys node {folder} --name {name}"
    missing = [f"{path} (create it with `{command}`)" for path, command in creates.items() if not path.is_file()]
    if missing:
        raise CredentialError(f"{folder} lacks {len(missing)} credential file(s): " + "; ".join(missing))
    return Credentials(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY,
                       tuple(node_key_paths(folder, local_node_name(i))[0] for i in range(num_nodes)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmeld keys", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ca = commands.add_parser("ca", help="server admin, once: the federation's CA (ca.pem travels, ca.key stays)")
    ca.add_argument("dir", type=Path)
    ca.add_argument("--days", type=int, default=3650, help="validity; default 3650")
    server = commands.add_parser("server", help="server admin: the SuperLink's TLS certificate, signed by DIR's CA")
    server.add_argument("dir", type=Path, help="the folder holding ca.pem and ca.key")
    server.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                        help="a name or address hospitals dial (repeat); localhost/127.0.0.1/::1 are always added")
    server.add_argument("--days", type=int, default=825, help="validity; default 825")
    node = commands.add_parser("node", help="each hospital: its SuperNode's key pair (only NAME.pub leaves the site)")
    node.add_argument("dir", type=Path)
    node.add_argument("--name", required=True, help="e.g. the hospital's name; files NAME.key and NAME.pub")
    secret = commands.add_parser("secret", help="each site with a fedmeld executor: the SuperExec shared secret")
    secret.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "ca":
            written = create_ca(args.dir, args.days)
            hint = "give ca.pem to every hospital; keep ca.key offline (it signs server certificates)"
        elif args.command == "server":
            written = create_server_certificate(args.dir, args.host, args.days)
            hint = ("start flower-superlink with --ssl-ca-certfile ca.pem --ssl-certfile server.pem "
                    "--ssl-keyfile server.key")
        elif args.command == "node":
            written = create_node_keys(args.dir, args.name)
            hint = f"send {args.name}.pub to the server admin; {args.name}.key never leaves this site"
        else:
            written = (create_secret(args.file),)
            hint = "pass it as --superexec-auth-secret-file to the SuperNode and to its fedmeld executor"
    except CredentialError as err:
        print(f"fedmeld keys: {err}", file=sys.stderr)
        return 1
    print("\n".join(map(str, written)) + f"\n{hint}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
