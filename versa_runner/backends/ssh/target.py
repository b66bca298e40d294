"""Where an SSH target is and whether to trust it: the parsed `--ssh` spec, the host-key
policy, and the one function that opens an authenticated paramiko connection.

Host keys: `~/.ssh/known_hosts` decides. An unknown host is refused unless the user asked for
`accept_new` (OpenSSH's `StrictHostKeyChecking=accept-new`: learn a new host, never a changed
key); nothing is ever added silently (paramiko's AutoAddPolicy is never used). With an explicit
key file only that key is offered (like `IdentitiesOnly`); without one, the agent and the
default `~/.ssh/id_*` keys are tried. Secrets (the key passphrase) never leave `SshTarget`.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from versa_runner.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_PORT = 22
KNOWN_HOSTS = "~/.ssh/known_hosts"
CONNECT_TIMEOUT_S = 20.0
KEEPALIVE_S = 15  # keeps NAT/firewall state alive while a follower sits between polls

AUTH_HINT = (
    "Check the user and --ssh-key (its public half must be in the host's authorized_keys); "
    "an encrypted key reads its passphrase from VERSA_SSH_PASSPHRASE."
)
UNKNOWN_HOST_TEMPLATE = (
    "host key of {host} ({key_type} {fingerprint}) is not in {known_hosts}; refusing to connect"
)
UNKNOWN_HOST_HINT = (
    "Verify that fingerprint out of band, then rerun once with --ssh-accept-new "
    "(or add the host with `ssh-keyscan -p PORT HOST >> ~/.ssh/known_hosts`)."
)


@dataclass(frozen=True)
class SshTarget:
    """Where to connect and how to authenticate; the passphrase is never shown."""

    host: str
    user: str
    port: int = DEFAULT_PORT
    key_file: Path | None = None
    passphrase: str | None = field(default=None, repr=False)
    accept_new: bool = False
    known_hosts: Path = field(default_factory=lambda: Path(KNOWN_HOSTS).expanduser())

    @property
    def described(self) -> str:
        return f"ssh:{self.user}@{self.host}:{self.port}"


def parse_ssh_spec(spec: str, *, port: int | None = None) -> tuple[str, str, int]:
    """`[user@]host[:port]` (or a journal's `ssh:user@host:port`) -> (user, host, port).

    `port` (from --ssh-port) must agree with a port in the spec when both are given.
    """
    text = spec.strip().removeprefix("ssh:")
    user, at, hostport = text.rpartition("@")
    user = user if at else getpass.getuser()
    host, colon, port_text = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    spec_port = None
    if colon:
        if not port_text.isdigit():
            raise UsageError(f"--ssh: expected user@host[:port], got {spec!r}")
        spec_port = int(port_text)
    if not host or not user or any(c.isspace() for c in text):
        raise UsageError(f"--ssh: expected user@host[:port], got {spec!r}")
    if spec_port is not None and port is not None and spec_port != port:
        raise UsageError(f"--ssh says port {spec_port} but --ssh-port says {port}; give one")
    chosen = port if port is not None else spec_port if spec_port is not None else DEFAULT_PORT
    if not 1 <= chosen <= 65535:
        raise UsageError(f"--ssh-port: expected a port 1..65535, got {chosen}")
    return user, host, chosen


def open_client(target: SshTarget) -> paramiko.SSHClient:
    """Connect and authenticate; paramiko's exceptions propagate to the backend's boundary."""
    client = paramiko.SSHClient()
    if target.known_hosts.exists():
        client.load_host_keys(str(target.known_hosts))
    known = target.known_hosts
    policy = AcceptNewHost(known) if target.accept_new else RefuseUnknownHost(known)
    client.set_missing_host_key_policy(policy)
    log.debug("connecting to %s", target.described)
    client.connect(
        target.host, port=target.port, username=target.user, pkey=load_key(target),
        look_for_keys=target.key_file is None, allow_agent=target.key_file is None,
        timeout=CONNECT_TIMEOUT_S, banner_timeout=CONNECT_TIMEOUT_S,
        auth_timeout=CONNECT_TIMEOUT_S,
    )  # fmt: skip
    client.get_transport().set_keepalive(KEEPALIVE_S)  # type: ignore[union-attr]
    return client


def load_key(target: SshTarget) -> paramiko.PKey | None:
    """The explicit key, decrypted here so a bad passphrase reads as an auth failure (paramiko
    would report "private key file checks do not match" as a bare SSHException)."""
    if target.key_file is None:
        return None
    path = target.key_file
    secret: Any = (
        target.passphrase.encode() if target.passphrase else None
    )  # the cipher wants bytes
    try:
        try:  # positional: paramiko 5 renamed `passphrase` to `password`
            return paramiko.PKey.from_path(path, secret)
        except TypeError:
            # cryptography's TypeError means "passphrase given, key not encrypted" or the
            # reverse (OpenSSH-format keys; PEM keys raise PasswordRequiredException instead).
            if secret is None:
                raise
            return paramiko.PKey.from_path(path, None)  # VERSA_SSH_PASSPHRASE was for another key
    except (paramiko.PasswordRequiredException, TypeError) as exc:
        raise paramiko.AuthenticationException(
            f"key {path} is encrypted and VERSA_SSH_PASSPHRASE is not set"
        ) from exc
    except (paramiko.SSHException, paramiko.pkey.UnknownKeyType, ValueError, OSError) as exc:
        raise paramiko.AuthenticationException(
            f"cannot use key {path} (wrong passphrase, unreadable or not a private key)"
        ) from exc


class UnknownHostKey(paramiko.SSHException):
    """Raised by the host-key policies; translated at the boundary."""


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's `SHA256:<base64>` form, so it can be compared with `ssh-keygen -lf`."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """OpenSSH's default for a host missing from known_hosts: refuse, showing the fingerprint."""

    def __init__(self, known_hosts: Path) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise UnknownHostKey(UNKNOWN_HOST_TEMPLATE.format(
            host=hostname, key_type=key.get_name(), fingerprint=fingerprint(key),
            known_hosts=self.known_hosts))  # fmt: skip


class AcceptNewHost(paramiko.MissingHostKeyPolicy):
    """OpenSSH's accept-new: remember a host seen for the first time (a changed key still fails,
    paramiko raises BadHostKeyException before asking a policy)."""

    def __init__(self, known_hosts: Path) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Append one line rather than rewrite: the user's comments and hashed entries stay.
        with open(self.known_hosts, "a", encoding="ascii") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("added %s key %s of %s to %s", key.get_name(), fingerprint(key), hostname,
                    self.known_hosts)  # fmt: skip


__all__ = [
    "AcceptNewHost",
    "RefuseUnknownHost",
    "SshTarget",
    "UnknownHostKey",
    "fingerprint",
    "load_key",
    "open_client",
    "parse_ssh_spec",
]
