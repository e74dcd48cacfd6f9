"""deploy/: what can be checked without docker or a cluster. The YAML parses as KServe
InferenceServices; image, ports, user and probe paths agree between the Dockerfile and the
manifests; the commands they run or name are valid `covid-cxr` invocations and the probed paths
exist; the serving image installs the torch-free `[serve]` extra, and that extra names no torch."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import typer.main

from covid_cxr.cli import app

yaml = pytest.importorskip("yaml")
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
VERSION = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["version"]


def _dockerfile() -> dict[str, list[str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word, []).append(rest.strip())
    return out


def _manifest(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((DEPLOY / "kserve" / name).read_text()))
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    return doc


def _args(argv: list[str], command: str = "serve") -> dict:
    """Parse a `covid-cxr COMMAND ...` command line as the CLI would (nothing run)."""
    assert argv[:2] == ["covid-cxr", command], argv
    cmd = typer.main.get_command(app).commands[command]
    argv = [a if a not in ("/models", "/mnt/models") else str(DEPLOY) for a in argv[2:]]  # must exist here
    return cmd.make_context(command, argv).params


def _serve_args(argv: list[str]) -> dict:
    return _args(argv, "serve")


def _pip_installs(runs: list[str]) -> list[list[str]]:
    """The argument lists of every `pip install` in the Dockerfile's RUN lines."""
    words = [shlex.split(part) for run in runs for part in run.split("&&")]
    return [w[w.index("install") + 1:] for w in words if w and w[0].endswith("pip") and "install" in w]


def _routes() -> set[str]:
    from covid_cxr.serve.app import create_app
    from covid_cxr.serve.settings import ServeSettings

    return set(create_app(ServeSettings(models=DEPLOY)).openapi()["paths"])


def test_dockerfile_serves_as_non_root_on_its_exposed_port_with_a_healthcheck():
    d = _dockerfile()
    port = int(d["EXPOSE"][0])
    cmd = json.loads(d["CMD"][0])
    assert _serve_args(cmd)["port"] == port and _serve_args(cmd)["host"] == "0.0.0.0"
    assert d["USER"] == ["10001"] and "useradd" in " ".join(d["RUN"])
    (health,) = re.findall(r"http://127\.0\.0\.1:(\d+)(/\S+?)'", d["HEALTHCHECK"][0])
    assert int(health[0]) == port and health[1] in _routes()
    assert "--models /models" in " ".join(cmd) and '"/models"' in d["VOLUME"][0]
    assert f"covid-cxr:{VERSION}" in (DEPLOY / "Dockerfile").read_text()


def test_custom_predictor_agrees_with_the_dockerfile():
    d = _dockerfile()
    (c,) = _manifest("custom-predictor.yaml")["spec"]["predictor"]["containers"]
    assert c["image"].endswith(f"/covid-cxr:{VERSION}")
    port = int(d["EXPOSE"][0])
    assert [p["containerPort"] for p in c["ports"]] == [port] and _serve_args(c["args"])["port"] == port
    assert _serve_args(c["args"])["models"] == DEPLOY  # /mnt/models: where KServe puts STORAGE_URI
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == port and c[probe]["httpGet"]["path"] in _routes()
    assert c["securityContext"]["runAsUser"] == int(d["USER"][0]) and c["securityContext"]["runAsNonRoot"]
    assert any(e["name"] == "STORAGE_URI" for e in c["env"])


def test_triton_runtime_serves_the_exported_repository():
    m = _manifest("triton-runtime.yaml")["spec"]["predictor"]["model"]
    assert m["modelFormat"]["name"] == "triton" and m["protocolVersion"] == "v2"
    assert m["storageUri"].endswith("/triton-repo") and m["runtime"] == "kserve-tritonserver"
    text = (DEPLOY / "kserve" / "triton-runtime.yaml").read_text().replace("\n#", " ")
    (command,) = re.findall(r"`(covid-cxr export [^`]+)`", text)  # the command the manifest names
    params = _args([a if a not in ("MODELS",) else "/models" for a in shlex.split(command)], "export")
    assert params["format"] == "triton" and params["out"].name == "REPO"
    with pytest.raises(Exception, match="No such option"):  # the parser refuses what export does not take
        _args(shlex.split(command) + ["--no-such-option"], "export")


def test_the_serving_image_installs_the_torch_free_serve_extra():
    installs = _pip_installs(_dockerfile()["RUN"])
    assert any(".[serve]" in args and "requirements.lock" in args for args in installs), installs
    assert not any(a.split("=")[0].split("[")[0] in ("torch", "torchvision") for args in installs for a in args)
    extras = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in extras["serve"]}
    assert "onnxruntime" in names and not names & {"torch", "torchvision", "lightning", "timm", "grad-cam"}
    assert {"torch", "lightning"} <= {re.split(r"[<>=\[ ]", d)[0].lower() for d in extras["train"]}
