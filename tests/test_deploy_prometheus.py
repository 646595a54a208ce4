"""Prometheus config, alert rules and the Grafana dashboard: checked and unit-tested with promtool, and
every expression limited to the metrics docs/operations.md documents."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests import deploy_support as ds

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; scripts/setup.sh does it as root)")
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def test_prometheus_config_is_valid(promtool):
    proc = run(promtool, "check", "config", str(ds.PROMETHEUS_CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_rules_are_valid(promtool):
    proc = run(promtool, "check", "rules", str(ds.ALERT_RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ds.alert_rules())} rules found" in proc.stdout


def test_alert_rules_unit_tests_pass(promtool):
    proc = run(promtool, "test", "rules", str(ds.ALERT_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_unit_tests_fail_when_a_threshold_moves(promtool, tmp_path):
    """The unit tests pin the behaviour: a latency threshold moved past the synthetic p99 breaks them."""
    rules = ds.ALERT_RULES.read_text(encoding="utf-8")
    assert ") > 0.25" in rules
    (tmp_path / ds.ALERT_RULES.name).write_text(rules.replace(") > 0.25", ") > 0.6"), encoding="utf-8")
    shutil.copy(ds.ALERT_TESTS, tmp_path / ds.ALERT_TESTS.name)
    proc = run(promtool, "test", "rules", str(tmp_path / ds.ALERT_TESTS.name))
    assert proc.returncode != 0
    assert "SeqServeStepLatencyHigh" in proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test_that_sees_it_fire():
    tests = ds.load_yaml(ds.ALERT_TESTS)["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert fired == set(ds.alert_expressions())


def test_alerts_are_documented_with_what_to_do():
    doc = " ".join(ds.OPERATIONS_DOC.read_text(encoding="utf-8").split())
    for rule in ds.alert_rules():
        assert f"**{rule['alert']}** ({rule['labels']['severity']})" in doc, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_expressions_parse(promtool, tmp_path):
    """promtool parses each panel query (as a recording rule), with the template variables filled in."""
    queries = ds.dashboard_queries()
    assert queries
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:panel_{i}", "expr": q.expr} for i, q in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    proc = run(promtool, "check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(queries)} rules found" in proc.stdout


def test_the_expression_check_rejects_bad_promql(promtool, tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x", "expr": "sum by (le (rate(x[1m]))"}]}]})
    )
    assert run(promtool, "check", "rules", str(path)).returncode != 0


def test_expressions_use_only_documented_metrics():
    documented = ds.documented_metrics()
    assert len(documented) >= 20  # the table was found
    expressions = {f"alert {name}": expr for name, expr in ds.alert_expressions().items()}
    expressions |= {f"panel {q.panel!r} {q.ref_id}": q.expr for q in ds.dashboard_queries()}
    expressions |= {f"variable {name}": query for name, query in ds.dashboard_variable_queries().items()}
    unknown = {
        where: sorted(name for name in ds.metric_names(expr) if ds.metric_family(name, documented) is None)
        for where, expr in expressions.items()
    }
    assert not {where: names for where, names in unknown.items() if names}
    used = {ds.metric_family(name, documented) for expr in expressions.values() for name in ds.metric_names(expr)}
    # every seqserve metric appears somewhere (an alert or a panel)
    assert {name for name in documented if name.startswith("seqserve_")} <= used


def test_metric_name_extraction():
    expr = (
        'histogram_quantile(0.99, sum by (model, le) (rate(seqserve_step_latency_seconds_bucket{model=~"a|b"}[5m])))'
        " / on (instance) group_left (cell) seqserve_model_info and up{job='x'} == 0"
    )
    assert ds.metric_names(expr) == {"seqserve_step_latency_seconds_bucket", "seqserve_model_info", "up"}
    assert ds.metric_names('label_values(seqserve_model_info{instance=~"$instance"}, model)') == {"seqserve_model_info"}


def test_metrics_table_matches_the_documented_types():
    documented = ds.documented_metrics()
    assert documented["seqserve_requests_total"] == "counter"
    assert documented["seqserve_step_latency_seconds"] == "histogram"
    assert documented["seqserve_sessions_active"] == "gauge"
    for name, kind in documented.items():
        assert name.endswith("_total") == (kind == "counter"), name


def test_dashboard_covers_what_operators_need():
    titles = [panel["title"] for panel in ds.dashboard_panels()]
    for needed in (
        "Requests per second by RPC",
        "Tokens per second by phase",
        "Step latency percentiles",
        "Batch size (rows per model run)",
        "Active sessions",
        "Recurrent state bytes",
        "Evictions",
        "Errors by reason",
    ):
        assert needed in titles
    doc = " ".join(ds.OPERATIONS_DOC.read_text(encoding="utf-8").split())  # line breaks as spaces
    for title in titles:
        assert f"*{title}*" in doc, f"panel {title!r} is not described in docs/operations.md"


def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource():
    dash = ds.dashboard()
    datasource = ds.load_yaml(ds.GRAFANA_DATASOURCES)["datasources"][0]
    assert dash["uid"] == "seqserve"
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in ds.dashboard_panels():
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
    # panels do not overlap on the grid
    cells = set()
    for panel in dash["panels"]:
        g = panel["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, panel["title"]
        cells |= area
    # variables: substituted away for Prometheus, each used by some panel
    for query in ds.dashboard_queries():
        assert "$" not in query.expr, query
    raw = json.dumps([q.raw for q in ds.dashboard_queries()])
    for variable in ds.dashboard()["templating"]["list"]:
        assert f"${variable['name']}" in raw
