"""The Flower App the SuperLink ships to the ServerApp and every SuperNode (a FAB built by
``flwr run`` from this folder): a ``pyproject.toml`` naming the components and two
two-line modules importing them from the installed ``recjob_trainer`` (the code that runs
is the package's, the same version everywhere)."""

from __future__ import annotations

from pathlib import Path

APP_NAME = "recjob-federation"
PACKAGE = "recjob_federation"

PYPROJECT = f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "RecJob federated fine-tuning (recjob_trainer.federated)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "recjob"

[tool.flwr.app.components]
serverapp = "{PACKAGE}.server:app"
clientapp = "{PACKAGE}.client:app"

[tool.flwr.app.config]
server-settings = ""
'''


def write_bundle(directory: Path) -> Path:
    """Write the app folder; returns it (the argument of ``flwr run``)."""
    package = directory / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text('"""RecJob federation (Flower App)."""\n')
    # `flwr run` checks the modules' source for an assignment to `app`
    for module, source in (("server", "server_app"), ("client", "client_app")):
        (package / f"{module}.py").write_text(
            f"from recjob_trainer.federated.{source} import app as _app\n\napp = _app\n"
        )
    return directory
