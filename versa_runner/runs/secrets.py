"""What counts as a secret, how secrets travel, and redaction by value.

A secret is: the value of each `--secret NAME` (read from the local environment at submit time),
a `--env NAME=VALUE` whose NAME looks secret (*TOKEN*, *KEY*, *SECRET*, *PASSWORD*), Jupyter
tokens, and credentials inside URLs (user:password@, Kaggle proxy paths). Secrets travel to the
target only inside `versa_runs/<run_id>/secrets.env` (mode 0600), which the launcher deletes
after reading (versa_spec §8.9). They never reach argv, notebook parameters, `params.yaml`,
`status.json`, the journal or anything the runner prints: `Redactor` replaces their literal values
(and the path of proxy URLs) with `***` in any text before it is shown or stored.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from versa_runner.errors import UsageError

MASK = "***"
SECRET_NAME_PATTERNS = ("*TOKEN*", "*KEY*", "*SECRET*", "*PASSWORD*")
# The Jupyter connection itself is never forwarded to a job (versa_spec §8.9).
NEVER_FORWARDED = ("KAGGLE_URL", "REMOTE_JUPYTER_URL", "VERSA_RUN_URL", "VERSA_RUN_TOKEN")
# Shorter values are not masked: replacing "1" or "ab" everywhere would garble output while
# protecting nothing a reader could not guess.
MIN_SECRET_CHARS = 4
_URL_RE = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<auth>[^/@\s]+@)?(?P<host>[^/\s?#]+)(?P<path>[^\s?#]*)(?P<rest>[^\s]*)"
)
_TOKEN_QUERY_RE = re.compile(r"((?:token|access_token|api_key)=)[^&\s#]+", re.IGNORECASE)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_secret_name(name: str) -> bool:
    """True when an environment variable's name says it holds a secret."""
    upper = name.upper()
    return any(fnmatch.fnmatchcase(upper, pattern) for pattern in SECRET_NAME_PATTERNS)


def is_never_forwarded(name: str, value: str) -> bool:
    """The target's own connection (proxy URLs, server tokens) must not reach the job."""
    return name.upper() in NEVER_FORWARDED or (name.upper().endswith("_URL") and "/proxy" in value)


@dataclass
class JobEnvironment:
    """What a job's environment gets: public values (shown, journaled) and secrets (never)."""

    public: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)

    @property
    def secret_names(self) -> list[str]:
        """Names (never values) of the secrets, sorted: safe to journal and print."""
        return sorted(self.secrets)


def collect_job_environment(
    *, secret_names: Iterable[str], env_pairs: Iterable[str], environ: Mapping[str, str]
) -> JobEnvironment:
    """Build the job environment from `--secret NAME` and `--env NAME=VALUE` flags.

    Raises UsageError (naming the flag) for a missing secret, a malformed pair, or a variable
    that must never be forwarded.
    """
    job = JobEnvironment()
    for name in secret_names:
        if not _ENV_NAME_RE.match(name):
            raise UsageError(f"--secret {name!r}: expected an environment variable name")
        if name not in environ:
            raise UsageError(
                f"--secret {name}: the variable is not set in this environment",
                hint=f"export {name}=... before running versa-run (the value is read, not passed).",
            )
        _refuse_forbidden("--secret", name, environ[name])
        job.secrets[name] = environ[name]
    for pair in env_pairs:
        name, sep, value = pair.partition("=")
        if not sep or not _ENV_NAME_RE.match(name):
            raise UsageError(f"--env {pair.split('=')[0]!r}: expected NAME=VALUE")
        _refuse_forbidden("--env", name, value)
        if is_secret_name(name):
            job.secrets[name] = value
        else:
            job.public[name] = value
    return job


def _refuse_forbidden(flag: str, name: str, value: str) -> None:
    if is_never_forwarded(name, value):
        raise UsageError(
            f"{flag} {name}: the target's connection URL/token is never forwarded to a job",
            hint="Pass job credentials (e.g. HF_TOKEN) with --secret; the runner keeps its own.",
        )


def encode_secrets_env(secrets: Mapping[str, str]) -> bytes:
    """The `secrets.env` payload: one `NAME=<json string>` line per secret (launcher format)."""
    return "".join(
        f"{name}={json.dumps(value)}\n" for name, value in sorted(secrets.items())
    ).encode()


def secret_values_from_env(
    names: Iterable[str], environ: Mapping[str, str] | None = None
) -> list[str]:
    """Current values of the named variables (for redacting output of later commands)."""
    environ = os.environ if environ is None else environ
    return [environ[name] for name in names if environ.get(name)]


class Redactor:
    """Replaces literal secret values and credential-bearing URL parts with `***`."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: list[str] = []
        for value in values:
            self.add(value)

    def add(self, value: str) -> None:
        """Register one more secret value (longest values are replaced first)."""
        if len(value) >= MIN_SECRET_CHARS and value not in self._values:
            self._values.append(value)
            self._values.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self._values:
            text = text.replace(value, MASK)
        return _URL_RE.sub(_redact_url_match, text)


def redact_url(url: str) -> str:
    """Keep scheme and host of a URL; mask user info and any proxy/credential path."""
    return _URL_RE.sub(_redact_url_match, url)


def _redact_url_match(match: re.Match[str]) -> str:
    path = match.group("path")
    # Kaggle's proxy URL carries its credential in the path (`/k/<n>/<jwt>/proxy`).
    secret_path = "/proxy" in path or path.startswith("/k/")
    auth = f"{MASK}@" if match.group("auth") else ""
    if secret_path:
        return f"{match.group('scheme')}{auth}{match.group('host')}/{MASK}"
    rest = _TOKEN_QUERY_RE.sub(rf"\1{MASK}", match.group("rest"))
    return f"{match.group('scheme')}{auth}{match.group('host')}{path}{rest}"
