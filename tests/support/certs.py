"""Throwaway certificate authorities and certificates for DICOM TLS tests, made with the openssl CLI.

Nothing here is committed: each test session writes its own keys into a temporary folder.
EC P-256 keys (fast to make; every peer under test accepts them).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Authority", "Issued", "make_authority"]


@dataclass(frozen=True)
class Issued:
    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Authority:
    folder: Path
    name: str
    certificate: Path
    private_key: Path

    def issue(self, common_name: str, *, server: bool = False, organization: str = "Test Hospital") -> Issued:
        """A certificate for ``common_name`` signed by this CA (with localhost names when ``server``)."""
        stem = self.folder / f"{self.name}-{common_name}"
        key, csr, cert, ext = (stem.with_suffix(s) for s in (".key", ".csr", ".pem", ".ext"))
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
        _openssl("req", "-new", "-key", str(key), "-subj", f"/O={organization}/CN={common_name}", "-out", str(csr))
        usage = "serverAuth,clientAuth" if server else "clientAuth"  # a server also calls out (exports, Orthanc)
        lines = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}"]
        if server:
            lines.append("subjectAltName=DNS:localhost,IP:127.0.0.1")
        ext.write_text("\n".join(lines) + "\n")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.certificate), "-CAkey", str(self.private_key),
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert),
        )  # fmt: skip
        return Issued(certificate=cert, private_key=key)


def make_authority(folder: Path, name: str) -> Authority:
    """A self-signed CA named ``name`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / f"{name}-ca.key", folder / f"{name}-ca.pem"
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-subj", f"/O={name}/CN={name} CA", "-days", "2", "-sha256",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", str(cert),
    )  # fmt: skip
    return Authority(folder=folder, name=name, certificate=cert, private_key=key)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)
