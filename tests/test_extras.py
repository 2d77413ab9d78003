"""Install weight: the core needs no recipe, chart or W&B package, and a missing extra is named in one line."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import tomllib

from lightning_hpsgd.extras import EXTRAS
from tests.launch import ROOT, base_env

OPTIONAL = set(EXTRAS)  # torchvision, mnist1d, matplotlib, wandb, wandb_workspaces
CORE = {"torch", "lightning", "typing-extensions", "jsonargparse"}

# A 1-device fit with strategy="hpsgd", its default monitor and a CSV logger; prints the optional modules loaded.
FIT = """
import sys
import lightning as L
from lightning.pytorch.loggers import CSVLogger
import lightning_hpsgd
from tests.models import Regressor, loader, make_batches

trainer = L.Trainer(strategy="hpsgd", accelerator="cpu", devices=1, max_steps=2, log_every_n_steps=1,
                    logger=CSVLogger(sys.argv[1], name="run"), enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False)
trainer.fit(Regressor(), loader(make_batches(4, 8, seed=0)))
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[2].split(",")))
"""


def run_python(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def loaded(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("LOADED ")]
    return ast.literal_eval(line.removeprefix("LOADED "))


def site_without(packages: set[str], tmp_path: Path) -> Path:
    """A copy (by links) of this interpreter's site-packages without ``packages``: modules and their metadata, as if
    they were never installed (Lightning and torchmetrics look at the metadata to decide what to import)."""
    site = tmp_path / "site-packages"
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = re.split(r"[-.]", entry.name.lower())[0]
        if name not in packages and name != "mpl_toolkits":
            (site / entry.name).symlink_to(entry)
    return site


def test_fit_with_the_default_monitor_imports_no_optional_package(tmp_path):
    # In this environment every extra is installed; Lightning's torchmetrics imports matplotlib and torchvision by
    # itself when they are there, so the check is on the packages nothing but this project could load.
    done = run_python(["-c", FIT, str(tmp_path), ",".join(OPTIONAL)], base_env(), ROOT)
    assert not set(loaded(done)) & {"wandb", "mnist1d", "wandb_workspaces"}, loaded(done)
    assert "time/wall_s" in (tmp_path / "run" / "version_0" / "metrics.csv").read_text()  # the monitor logged


def test_fit_and_the_one_line_error_without_any_extra_installed(tmp_path):
    site = site_without(OPTIONAL, tmp_path)
    env = {**base_env(), "PYTHONPATH": f"{ROOT}:{site}"}
    # -S: no site-packages but the reduced one, so torchvision, mnist1d, matplotlib and wandb are not installed.
    done = run_python(["-S", "-c", FIT, str(tmp_path), ",".join(OPTIONAL)], env, ROOT)
    assert loaded(done) == []
    assert "time/wall_s" in (tmp_path / "run" / "version_0" / "metrics.csv").read_text()

    # The real entry point, hpsgd plot, on the run just written: one line that names the extra, no traceback.
    done = run_python(["-S", "-m", "lightning_hpsgd", "plot", str(tmp_path / "run")], env, ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "hpsgd plot: error: hpsgd plot needs matplotlib, which is not installed: pip install 'lightning-hpsgd[plot]'"
    )
    assert "Traceback" not in done.stderr


def test_core_dependencies_and_every_optional_import_names_an_existing_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\[<>=~! ]", req, maxsplit=1)[0].lower() for req in project["dependencies"]}
    assert names == CORE
    extras = project["optional-dependencies"]
    for module, (extra, distribution) in EXTRAS.items():
        in_extra = {re.split(r"[\[<>=~! ]", req, maxsplit=1)[0].lower() for req in extras[extra]}
        assert distribution in in_extra, (module, extra)
    (everything,) = extras["all"]
    assert everything.removeprefix("lightning-hpsgd[").removesuffix("]").split(",") == ["recipes", "plot", "wandb"]
    assert {extra for extra, _ in EXTRAS.values()} == {"recipes", "plot", "wandb"}

    # No import statement of an optional package anywhere in the package: each goes through extras.require, which
    # names the extra. Every require() names a module whose package has an extra.
    required = []
    for path in sorted((ROOT / "lightning_hpsgd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] if node.level == 0 else []
            else:
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require":
                    required.append((path.name, node.args[0].value))
                continue
            offending = [m for m in modules if m.split(".")[0] in OPTIONAL]
            assert not offending, f"{path.relative_to(ROOT)}:{node.lineno} imports {offending}: use extras.require"
    assert {module.split(".")[0] for _, module in required} == OPTIONAL, required
