"""Failed downloads explain themselves; the dataset is checked and downloads resume.

The TLS failure is real: an HTTPS server on the loopback interface presents a
self-signed certificate made for the test, which Python rightly refuses. Setting
SSL_CERT_FILE to that certificate (the fix the message names) makes it work.
Proxies are real too: a refused connection to a proxy address, and an HTTP server
acting as a proxy that demands a password (407).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from http_fixtures import FileServer, closed_port_url, no_proxy  # noqa: F401

import course.data
import helpers
from course.artifacts import sha256_of_file
from course.data import DATA_SHA256, DatasetError, load_instruction_data
from course.downloads import describe_network_error, download_file
from course.gpt2_files import download_gpt2_tf_files
from course.weights import load_gpt2

ROOT = Path(__file__).resolve().parent.parent
DATASET = (ROOT / "instruction-data.json").read_bytes()


# --- a self-signed certificate and an HTTPS server --------------------------------------


def make_self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """Write cert.pem and key.pem for "localhost" and 127.0.0.1, valid for a day.

    Uses the `cryptography` package when installed, otherwise the `openssl` command.
    """
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.fail(
                "This test needs the cryptography package (pip install cryptography) "
                "or the openssl command to make a self-signed certificate."
            )
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,digitalSignature,keyCertSign",
                "-addext",
                "extendedKeyUsage=serverAuth",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        return cert, key
    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)  # self-signed: it vouches for itself
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(private_key.public_key()), critical=False
        )
        .sign(private_key, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


class _FileHandler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def do_GET(self):
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HTTPSFileServer:
    """Serve {path: bytes} over HTTPS on a free loopback port with the given certificate."""

    def __init__(self, files: dict[str, bytes], cert: Path, key: Path):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
        self.httpd.daemon_threads = True
        self.httpd.files = files
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://localhost:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HTTPSFileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    return make_self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def https_server(certificate, no_proxy, monkeypatch):  # noqa: F811
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with HTTPSFileServer({"/instruction-data.json": DATASET}, *certificate) as server:
        yield server


@pytest.fixture
def fresh_opener(monkeypatch):
    """urllib reads the proxy variables once, when it builds its opener: rebuild it."""
    monkeypatch.setattr(urllib.request, "_opener", None)


def assert_certificate_advice(message: str) -> None:
    assert "CERTIFICATE_VERIFY_FAILED" in message, message
    assert "certificate could not be verified" in message, message
    assert "SSL_CERT_FILE" in message and "Install Certificates.command" in message, message


# --- TLS ----------------------------------------------------------------------------------


def test_tls_failure_from_download_file(https_server, tmp_path):
    target = tmp_path / "instruction-data.json"
    with pytest.raises(urllib.error.URLError) as info:
        download_file(https_server.url + "/instruction-data.json", target)
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
    assert_certificate_advice(describe_network_error(info.value))
    assert list(tmp_path.iterdir()) == [], "nothing may be written when TLS fails"


def test_tls_failure_from_download_and_load_file(https_server, tmp_path):
    target = tmp_path / "instruction-data.json"
    url = https_server.url + "/instruction-data.json"
    with pytest.raises(ConnectionError) as info:
        load_instruction_data(target, url)
    message = str(info.value)
    assert_certificate_advice(message)
    assert url in message and str(target) in message
    assert not target.exists()


def test_the_advised_fix_works(https_server, certificate, tmp_path, monkeypatch):
    """Trusting the certificate through SSL_CERT_FILE, as the message says, works."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    target = tmp_path / "instruction-data.json"
    data = load_instruction_data(
        target, https_server.url + "/instruction-data.json", expected_sha256=DATA_SHA256
    )
    assert len(data) == 1100
    assert target.read_bytes() == DATASET


def test_tls_failure_from_openais_hosts(https_server, tmp_path):
    with pytest.raises(ConnectionError) as info:
        download_gpt2_tf_files(
            "124M",
            tmp_path,
            base_url=https_server.url + "/openai",
            backup_base_url=https_server.url + "/backup",
        )
    message = str(info.value)
    assert_certificate_advice(message)
    # every file is named, and the reason is given once per host
    for name in helpers.GPT2_FILES:
        assert f"  {name}\n" in message
    assert message.count("CERTIFICATE_VERIFY_FAILED") == 2
    assert f"- {https_server.url}/openai: [SSL: CERTIFICATE_VERIFY_FAILED]" in message
    assert f"- {https_server.url}/backup: [SSL: CERTIFICATE_VERIFY_FAILED]" in message


def test_tls_failure_from_download_and_load_gpt2(https_server, tmp_path):
    with pytest.raises(ConnectionError) as info:
        load_gpt2(
            "124M",
            tmp_path,
            base_url=https_server.url,
            backup_base_url=https_server.url,
            safetensors_base_url=https_server.url,
        )
    message = str(info.value)
    assert_certificate_advice(message)
    assert f"Could not download GPT-2 124M from {https_server.url}/gpt2" in message
    assert "Before that:" in message  # why OpenAI's checkpoint was not used


# --- unreachable hosts and proxies ------------------------------------------------------


def test_refused_connection_mentions_connection_and_proxy(tmp_path, no_proxy):  # noqa: F811
    target = tmp_path / "instruction-data.json"
    with pytest.raises(ConnectionError) as info:
        load_instruction_data(target, closed_port_url() + "/instruction-data.json")
    message = str(info.value)
    assert "Connection refused" in message
    assert "Check the internet connection" in message and "HTTPS_PROXY=" in message
    assert not target.exists()


def test_unreachable_proxy_is_named(tmp_path, monkeypatch, fresh_opener):
    proxy = closed_port_url().replace("http://", "http://student:secret@")
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("http_proxy", proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    url = "http://course-data.invalid/instruction-data.json"  # only the proxy would look it up
    with pytest.raises(ConnectionError) as info:
        load_instruction_data(tmp_path / "data.json", url)
    message = str(info.value)
    assert "Connection refused" in message
    assert "through the proxy " + proxy.replace("student:secret@", "") in message
    assert "HTTP_PROXY" in message and "unset the variable" in message
    assert "secret" not in message, "a proxy password must never be printed"


def test_proxy_asking_for_a_password(tmp_path, monkeypatch, fresh_opener):
    with FileServer({}, fail_status=407) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        url = "http://course-data.invalid/instruction-data.json"
        with pytest.raises(ConnectionError) as info:
            load_instruction_data(tmp_path / "data.json", url)
        # the request really went to the proxy, for the full URL
        assert proxy.requests and proxy.requests[0]["path"] == url
    message = str(info.value)
    assert "407 Proxy Authentication Required" in message
    assert "HTTPS_PROXY=http://user:password@proxy:8080" in message


# --- the dataset's checksum ---------------------------------------------------------------


def tampered_dataset() -> bytes:
    """Valid JSON with valid entries, but not the book's: only the checksum can tell."""
    return DATASET.replace(b'"output": "', b'"output": "Hacked. ', 1)


def test_checksum_mismatch_is_rejected_and_nothing_is_kept(tmp_path, no_proxy):  # noqa: F811
    assert tampered_dataset() != DATASET
    target = tmp_path / "instruction-data.json"
    with FileServer({"/instruction-data.json": tampered_dataset()}) as server:
        with pytest.raises(DatasetError) as info:
            load_instruction_data(
                target,
                server.url + "/instruction-data.json",
                expected_sha256=DATA_SHA256,
            )
    message = str(info.value)
    assert DATA_SHA256 in message and "SHA-256" in message
    assert "deleted" in message and "Run the cell again" in message
    assert list(tmp_path.iterdir()) == [], "a file that failed its checksum must not stay"


def test_canonical_url_is_always_checked(tmp_path, monkeypatch, no_proxy):  # noqa: F811
    """A download from DATA_URL is checked even when no checksum is passed."""
    with FileServer(
        {"/good/instruction-data.json": DATASET, "/bad/instruction-data.json": tampered_dataset()}
    ) as server:
        monkeypatch.setattr(course.data, "DATA_URL", server.url + "/bad/instruction-data.json")
        with pytest.raises(DatasetError, match="SHA-256"):
            load_instruction_data(tmp_path / "bad.json", course.data.DATA_URL)
        assert not (tmp_path / "bad.json").exists()

        monkeypatch.setattr(course.data, "DATA_URL", server.url + "/good/instruction-data.json")
        data = load_instruction_data(tmp_path / "good.json", course.data.DATA_URL)
        assert len(data) == 1100

        # from any other address the file is only validated, as the book does
        other = load_instruction_data(
            tmp_path / "other.json", server.url + "/bad/instruction-data.json"
        )
        assert other[0]["output"].startswith("Hacked. ")


def test_shipped_dataset_matches_the_checksum():
    assert sha256_of_file(ROOT / "instruction-data.json") == DATA_SHA256


# --- resuming -------------------------------------------------------------------------------


def test_dataset_download_resumes_after_a_dropped_connection(tmp_path, no_proxy):  # noqa: F811
    path = "/instruction-data.json"
    target = tmp_path / "instruction-data.json"
    part = tmp_path / "instruction-data.json.part"
    with FileServer({path: DATASET}, cut_once=(path,)) as server:
        url = server.url + path
        with pytest.raises(ConnectionError, match="Run the cell again"):
            load_instruction_data(target, url, expected_sha256=DATA_SHA256)
        assert not target.exists(), "only a whole, checked file gets the final name"
        have = part.stat().st_size
        assert 0 < have < len(DATASET)
        assert DATASET.startswith(part.read_bytes())

        data = load_instruction_data(target, url, expected_sha256=DATA_SHA256)
        requests = server.requests_for(path)
    assert [r["range"] for r in requests] == [None, f"bytes={have}-"]
    assert requests[1]["status"] == 206
    assert len(data) == 1100
    assert target.read_bytes() == DATASET
    assert not part.exists()


def test_resumed_download_of_the_wrong_bytes_is_caught(tmp_path, no_proxy):  # noqa: F811
    """A stale part file (from another version of the file) fails the checksum."""
    path = "/instruction-data.json"
    target = tmp_path / "instruction-data.json"
    part = tmp_path / "instruction-data.json.part"
    part.write_bytes(b"[" + b" " * 999)  # the first 1000 bytes of something else
    with FileServer({path: DATASET}) as server:
        url = server.url + path
        with pytest.raises(DatasetError, match="SHA-256"):
            load_instruction_data(target, url, expected_sha256=DATA_SHA256)
        assert list(tmp_path.iterdir()) == []
        data = load_instruction_data(target, url, expected_sha256=DATA_SHA256)
        ranges = [r["range"] for r in server.requests_for(path)]
    assert ranges == ["bytes=1000-", None]
    assert len(data) == 1100


def test_part_file_longer_than_the_file_starts_over(tmp_path, no_proxy):  # noqa: F811
    """The server answers 416 with the real size: the part file is not this file's."""
    path = "/instruction-data.json"
    target = tmp_path / "instruction-data.json"
    (tmp_path / "instruction-data.json.part").write_bytes(b"x" * (len(DATASET) + 10))
    with FileServer({path: DATASET}) as server:
        data = load_instruction_data(target, server.url + path)
        statuses = [(r["range"], r["status"]) for r in server.requests_for(path)]
    assert statuses == [(f"bytes={len(DATASET) + 10}-", 416), (None, 200)]
    assert len(data) == 1100 and target.read_bytes() == DATASET
