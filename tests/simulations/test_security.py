"""simulations/security.py: the deployment's credentials. Certificates that a TLS client accepts for
exactly the names they list, node keys in the format flower-supernode parses, private files only
readable by their owner, and nothing ever overwritten."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedmeld.simulations import security
from fedmeld.simulations.security import CredentialError


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    """A folder holding a CA and a server certificate for superlink.example.org and 10.0.0.5."""
    folder = tmp_path / "server"
    security.create_ca(folder)
    security.create_server_certificate(folder, ["superlink.example.org", "10.0.0.5"])
    return folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_is_signed_by_the_ca_for_the_given_names_and_loopback(ca_dir):
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((ca_dir / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    addresses = [ipaddress.ip_address(a) for a in ("10.0.0.5", "127.0.0.1", "::1")]
    assert san.get_values_for_type(x509.IPAddress) == addresses
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert isinstance(server.public_key().curve, ec.SECP384R1)


def test_private_files_are_owner_only_and_public_ones_readable(ca_dir, tmp_path):
    private, public = security.create_node_keys(tmp_path / "hospital", "hospital-a")
    secret = security.create_secret(tmp_path / "hospital" / "superexec.secret")
    assert [_mode(p) for p in (ca_dir / "ca.key", ca_dir / "server.key", private, secret)] == [0o600] * 4
    assert [_mode(p) for p in (ca_dir / "ca.pem", ca_dir / "server.pem", public)] == [0o644] * 3
    # written under temporary names and linked into place: no temporary file is left behind
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]
    assert sorted(p.name for p in (tmp_path / "hospital").iterdir()) == ["hospital-a.key", "hospital-a.pub",
                                                                          "superexec.secret"]
    assert len(secret.read_bytes()) == 64  # 32 random bytes, hex


def test_node_keys_are_openssh_p384_pairs(tmp_path):
    """What flower-supernode --auth-supernode-private-key parses (load_ssh_private_key, an EC key)
    and flwr supernode register reads (the OpenSSH public key)."""
    private, public = security.create_node_keys(tmp_path, "hospital-a")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    assert load_ssh_public_key(public.read_bytes()) == key.public_key()
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ") and public.read_text().endswith(" hospital-a\n")
    other, _ = security.create_node_keys(tmp_path, "hospital-b")
    assert load_ssh_private_key(other.read_bytes(), password=None).public_key() != key.public_key()


@pytest.mark.parametrize("create", [
    lambda folder: security.create_ca(folder),
    lambda folder: security.create_server_certificate(folder),
    lambda folder: security.create_node_keys(folder, "supernode-0"),
], ids=["ca", "server", "node"])
def test_nothing_is_overwritten(create, tmp_path):
    security.create_ca(tmp_path)
    security.create_server_certificate(tmp_path)
    security.create_node_keys(tmp_path, "supernode-0")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CredentialError, match=r"exists already; fedmeld never overwrites credentials: move it away"):
        create(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_server_certificate_needs_the_ca_first(tmp_path):
    with pytest.raises(CredentialError, match=rf"{tmp_path / 'ca.pem'} not found: create the CA first with "
                                              rf"`fedmeld keys ca {tmp_path}`"):
        security.create_server_certificate(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_certs_folder_names_each_missing_file_with_the_command_that_creates_it(ca_dir):
    security.create_node_keys(ca_dir, "supernode-0")
    with pytest.raises(CredentialError) as refused:
        security.load_local_credentials(ca_dir, 2)
    assert str(refused.value) == (
        f"{ca_dir} lacks 2 credential file(s): "
        f"{ca_dir / 'supernode-1.key'} (create it with `fedmeld keys node {ca_dir} --name supernode-1`); "
        f"{ca_dir / 'supernode-1.pub'} (create it with `fedmeld keys node {ca_dir} --name supernode-1`)")
    found = security.load_local_credentials(ca_dir, 1)
    assert found.ca == ca_dir / "ca.pem" and found.node_keys == (ca_dir / "supernode-0.key",)


def _handshake(ca_file: Path, server_dir: Path, name: str) -> str:
    """A TLS handshake on loopback between a server with ``server_dir``'s certificate and a client that
    trusts ``ca_file`` and dials ``name``: "ok", or why the client refused the server."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(server_dir / "server.pem", server_dir / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve() -> None:
            conn, _ = listener.accept()
            try:
                server_ctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()  # the client refused us
        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=name):
                result = "ok"
        except ssl.SSLCertVerificationError as err:
            result = err.verify_message
        thread.join(timeout=10)
    return result


def test_tls_clients_trusting_the_ca_accept_the_server_for_its_names_only(ca_dir, tmp_path):
    for name in ("superlink.example.org", "10.0.0.5", "localhost", "127.0.0.1"):
        assert _handshake(ca_dir / "ca.pem", ca_dir, name) == "ok"
    assert "mismatch" in _handshake(ca_dir / "ca.pem", ca_dir, "other.example.org")
    security.create_ca(tmp_path / "another")  # a client holding another federation's CA refuses this server
    assert _handshake(tmp_path / "another" / "ca.pem", ca_dir, "localhost") == "unable to get local issuer certificate"


def test_keys_command_writes_what_each_role_needs_and_refuses_to_overwrite(tmp_path, capsys):
    assert security.main(["ca", str(tmp_path / "admin")]) == 0
    assert security.main(["server", str(tmp_path / "admin"), "--host", "superlink.example.org"]) == 0
    assert security.main(["node", str(tmp_path / "site"), "--name", "hospital-a"]) == 0
    assert "send hospital-a.pub to the server admin; hospital-a.key never leaves this site" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "admin").iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]
    assert security.main(["node", str(tmp_path / "site"), "--name", "hospital-a"]) == 1
    assert f"fedmeld keys: {tmp_path / 'site' / 'hospital-a.key'} exists already" in capsys.readouterr().err
