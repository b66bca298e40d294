"""`versa-run doctor` for a Jupyter target: one check per line, stopping where the rest depend."""

from __future__ import annotations

from dataclasses import dataclass

from versa_runner.backends.base import call_target
from versa_runner.backends.jupyter.backend import ROOT_TIMEOUT_S, JupyterBackend
from versa_runner.errors import AuthError, TargetError


@dataclass(frozen=True)
class DoctorCheck:
    """One line of `versa-run doctor`: what was checked, whether it passed, what was seen."""

    name: str
    ok: bool
    detail: str


def doctor(backend: JupyterBackend, *, min_free_gb: float = 5.0) -> list[DoctorCheck]:
    """Reachability, auth, kernel, python, papermill, GPUs and free disk of a Jupyter target.

    Stops at the first check the rest depend on (no point starting a kernel on a 403).
    """
    checks: list[DoctorCheck] = []
    url = backend.target.redacted_url
    try:
        version = backend.http.request("GET", "/api").json().get("version", "?")
    except AuthError:
        version = "?"  # some proxies guard even /api; the auth check below says more
    except TargetError as exc:  # unreachable, or a 404 from a proxy that forgot the path
        hint = exc.hint or "Check the URL; a Kaggle URL changes when its session restarts."
        return [DoctorCheck("reachable", False, f"{url}: {exc} -- {hint}")]
    checks.append(DoctorCheck("reachable", True, f"{url} (jupyter_server {version})"))
    try:
        backend.api_status()
    except AuthError as exc:
        return [*checks, DoctorCheck("auth", False, f"{exc} -- {exc.hint}")]
    checks.append(DoctorCheck("auth", True, "token" if backend.target.token else "URL credential"))
    try:
        info = call_target(backend, "ops.preflight", {"root": backend.root()},
                           timeout_s=ROOT_TIMEOUT_S)  # fmt: skip
    except TargetError as exc:
        return [*checks, DoctorCheck("kernel", False, str(exc))]
    checks.append(DoctorCheck("kernel", True, f"launcher kernel {backend.kernel_id}"))
    checks.append(DoctorCheck("python", True, f"{info['python']} ({info['executable']})"))
    checks.append(DoctorCheck("papermill", bool(info["papermill"] and info["ipykernel"]),
                              "papermill + ipykernel importable" if info["papermill"]
                              and info["ipykernel"] else "missing: install or use --profile kaggle"))  # fmt: skip
    checks.append(DoctorCheck("gpus", True, "; ".join(info["gpus"]) or "none visible"))
    free_gb = info["free_bytes"] / 1e9
    checks.append(DoctorCheck("disk", free_gb >= min_free_gb,
                              f"{free_gb:.1f} GB free under {backend.root()} (need {min_free_gb:g})"))  # fmt: skip
    return checks


__all__ = ["DoctorCheck", "doctor"]
