"""The deployment files and what is in them, for the tests in tests/test_deploy_*.py and any test that
checks the expressions against a real Prometheus scraping a real server.

Every PromQL expression the alerts and the Grafana dashboard evaluate comes out of here, with the
dashboard's template variables replaced so that Prometheus itself can run them.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERFILE_GPU = ROOT / "Dockerfile.gpu"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
GRAFANA_DATASOURCES = GRAFANA_PROVISIONING / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARD_PROVIDERS = GRAFANA_PROVISIONING / "dashboards" / "seqserve.yml"
GRAFANA_DASHBOARD = DEPLOY / "grafana" / "dashboards" / "seqserve.json"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"


def config_files() -> dict[str, Path]:
    """Every deployment file by a short name."""
    return {
        "compose": COMPOSE_FILE,
        "dockerfile": DOCKERFILE,
        "dockerfile_gpu": DOCKERFILE_GPU,
        "dockerignore": DOCKERIGNORE,
        "prometheus": PROMETHEUS_CONFIG,
        "alerts": ALERT_RULES,
        "alerts_test": ALERT_TESTS,
        "grafana_datasources": GRAFANA_DATASOURCES,
        "grafana_dashboard_providers": GRAFANA_DASHBOARD_PROVIDERS,
        "grafana_dashboard": GRAFANA_DASHBOARD,
    }


# -- Dockerfiles -----------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def last(self, instruction: str) -> str:
        found = self.all(instruction)
        assert found, f"stage {self.name} has no {instruction}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """Its ENV settings (``KEY=value`` form), in order."""
        found: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                found[key] = value
        return found


def stages(path: Path) -> list[Stage]:
    """The build stages of a Dockerfile, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    result: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = args.split()
            result.append(Stage(parts[0], parts[2] if len(parts) > 2 else str(len(result))))
        elif result:
            result[-1].instructions.append((instruction, args.strip()))
    return result


def server_stage(path: Path = DOCKERFILE) -> Stage:
    return next(s for s in stages(path) if s.name == "server")


def server_launch(overrides: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """How the server image starts the server: its ENTRYPOINT (exec form) and its SEQSERVE_*
    settings, with ``overrides`` (e.g. loopback ports) applied; for running it outside a container."""
    stage = server_stage()
    argv = json.loads(stage.last("ENTRYPOINT")) + json.loads(stage.last("CMD") if stage.all("CMD") else "[]")
    env = {key: value for key, value in stage.env().items() if key.startswith("SEQSERVE_")}
    return argv, {**env, **overrides}


def load_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def tool(name: str) -> str | None:
    """Path of a command-line tool: the project's .venv first (hadolint, check-jsonschema), then PATH."""
    local = ROOT / ".venv" / "bin" / name
    return str(local) if local.exists() else shutil.which(name)


# -- alert rules ---------------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of alerts.yml (its dict: alert, expr, for, labels, annotations)."""
    return [rule for group in load_yaml(ALERT_RULES)["groups"] for rule in group["rules"] if "alert" in rule]


def alert_expressions() -> dict[str, str]:
    """alert name -> its PromQL expression."""
    return {rule["alert"]: rule["expr"].strip() for rule in alert_rules()}


# -- dashboard -------------------------------------------------------------------------------------

# What the dashboard's variables stand for when an expression runs outside Grafana: every server,
# every model, and a rate window of four 15 s scrapes (what $__rate_interval is with the
# datasource's 15 s timeInterval).
DEFAULT_VARIABLES = {"instance": ".*", "model": ".*", "__rate_interval": "1m"}


@dataclass(frozen=True)
class PanelQuery:
    panel: str  # the panel's title
    ref_id: str
    expr: str  # with the template variables replaced
    raw: str  # as written in the dashboard


def dashboard() -> dict[str, Any]:
    return json.loads(GRAFANA_DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels() -> list[dict[str, Any]]:
    """The panels that show data (rows left out), nested rows' panels included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    """Replace Grafana's ``$name`` / ``${name}`` variables (longest names first)."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr


def dashboard_queries(variables: dict[str, str] | None = None) -> list[PanelQuery]:
    """Every panel query of the dashboard, in panel order."""
    return [
        PanelQuery(panel["title"], target["refId"], substitute(target["expr"], variables), target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


def dashboard_expressions(variables: dict[str, str] | None = None) -> list[str]:
    """Every PromQL expression of the dashboard's panels, runnable as is by Prometheus."""
    return [query.expr for query in dashboard_queries(variables)]


def dashboard_variable_queries() -> dict[str, str]:
    """The template variables' queries (Grafana's ``label_values(...)``, not PromQL)."""
    return {var["name"]: var["definition"] for var in dashboard()["templating"]["list"] if var["type"] == "query"}


# -- metric names ------------------------------------------------------------------------------------

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels and strings left out)."""
    text = _STRING.sub('""', expr)
    text = _LABEL_LIST.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", text)))
    # label_values(metric{...}, label): the second argument is a label, not a metric
    text = re.sub(r"label_values\(([^,]*),[^)]*\)", r"(\1)", text)
    names = set()
    for match in _IDENT.finditer(text):
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def documented_metrics() -> dict[str, str]:
    """Metric name -> type ("counter", "histogram", "gauge"), from the metrics table of docs/operations.md."""
    found: dict[str, str] = {}
    for line in OPERATIONS_DOC.read_text(encoding="utf-8").splitlines():
        row = re.match(r"\|\s*`([a-z_:]+)(?:\{[^`]*\})?`\s*\|\s*(counter|histogram|gauge)\s*\|", line)
        if row:
            found[row.group(1)] = row.group(2)
    return found


def metric_family(name: str, documented: dict[str, str]) -> str | None:
    """The documented metric a sample name belongs to (``x_bucket`` -> ``x`` for a histogram), or None."""
    if name in documented:
        return name
    for suffix in _HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and documented.get(base) == "histogram":
            return base
    return None
