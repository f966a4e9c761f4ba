"""`moe-serve dashboard` against a fake Grafana (no Grafana server is installable here), and the
dashboard JSON itself: exported metric names, one data source variable."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.cli.command import main
from serving.cli.dashboard import DATASOURCE_UID, dashboard_exprs, load_dashboard
from serving.control import metrics
from tests.support import free_port


class FakeGrafana:
    """Records each request (method, path, headers, JSON body) and answers as Grafana 10 does."""

    def __init__(self, datasource_exists: bool = False, token: str | None = None):
        self.requests: list[tuple[str, str, dict, object]] = []
        self.datasource_exists, self.token = datasource_exists, token
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append((self.command, self.path, dict(self.headers), body))
                status, answer = fake.answer(self.command, self.path, self.headers)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, method: str, path: str, headers) -> tuple[int, dict]:
        if self.token and headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"message": "Unauthorized"}
        if (method, path) == ("POST", "/api/datasources"):
            if self.datasource_exists:
                return 409, {"message": "data source with the same name already exists"}
            return 200, {"id": 1, "message": "Datasource added", "name": "moe-serve Prometheus"}
        if (method, path) == ("PUT", f"/api/datasources/uid/{DATASOURCE_UID}"):
            return 200, {"id": 1, "message": "Datasource updated"}
        if (method, path) == ("POST", "/api/dashboards/db"):
            return 200, {"id": 7, "uid": "moe-serve", "url": "/d/moe-serve/moe-serve", "version": 1}
        return 404, {"message": "Not found"}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def grafana():
    fakes = []

    def start(**kwargs) -> FakeGrafana:
        fakes.append(FakeGrafana(**kwargs))
        return fakes[-1]

    yield start
    for fake in fakes:
        fake.close()


def provision(url: str, *extra: str) -> int:
    return main(["dashboard", "--grafana-url", url, "--prometheus-url", "http://prom:9090", *extra])


def test_provisions_datasource_then_dashboard(grafana, capsys):
    fake = grafana(token="KEY")
    assert provision(fake.url, "--api-key", "KEY") == 0
    calls = [(method, path) for method, path, _, _ in fake.requests]
    assert calls == [("POST", "/api/datasources"), ("POST", "/api/dashboards/db")]
    _, _, headers, datasource = fake.requests[0]
    assert headers["Authorization"] == "Bearer KEY"
    assert datasource["type"] == "prometheus" and datasource["access"] == "proxy"
    assert (datasource["url"], datasource["uid"]) == ("http://prom:9090", DATASOURCE_UID)
    body = fake.requests[1][3]
    sent, bundled = body["dashboard"], load_dashboard()
    assert body["overwrite"] is True and sent["id"] is None
    assert sent["uid"] == bundled["uid"] and sent["panels"] == bundled["panels"]
    (ds_var,) = [v for v in sent["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["current"]["value"] == DATASOURCE_UID
    assert f"{fake.url}/d/moe-serve/moe-serve" in capsys.readouterr().out


def test_existing_datasource_is_updated_in_place(grafana):
    fake = grafana(datasource_exists=True)
    assert provision(fake.url) == 0
    calls = [(method, path) for method, path, _, _ in fake.requests]
    assert calls == [
        ("POST", "/api/datasources"),
        ("PUT", f"/api/datasources/uid/{DATASOURCE_UID}"),
        ("POST", "/api/dashboards/db"),
    ]


def test_credentials_in_the_url_are_basic_auth_and_never_printed(grafana, capsys):
    fake = grafana()
    url = fake.url.replace("http://", "http://admin:s3cret@")
    assert provision(url) == 0
    expected = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    assert fake.requests[0][2]["Authorization"] == expected
    assert "s3cret" not in capsys.readouterr().out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_unreachable_grafana_is_one_line(capsys):
    port = free_port()  # a port nobody listens on
    assert provision(f"http://127.0.0.1:{port}", "--timeout", "2") == 2
    err = one_error_line(capsys)
    assert "Grafana unreachable" in err and f"127.0.0.1:{port}" in err


def test_unauthorized_is_one_line(grafana, capsys):
    fake = grafana(token="RIGHT")
    assert provision(fake.url, "--api-key", "WRONG") == 2
    assert "unauthorized; give --api-key" in one_error_line(capsys)


def test_bad_url_is_one_line(capsys):
    assert provision("127.0.0.1:3000") == 2
    assert "expected http://HOST:PORT" in one_error_line(capsys)


# --- the dashboard JSON ---


def test_dashboard_queries_use_exported_names_for_every_metric():
    dashboard = load_dashboard()
    exprs = dashboard_exprs(dashboard)
    text = "\n".join(exprs)
    for name in metrics.METRIC_NAMES:
        assert metrics.exported_name(name) in text, f"{name} has no panel"
    # Ray exports custom metrics prefixed: an unprefixed moe_ name would never match.
    assert "(moe_" not in text and " moe_" not in text
    assert all("$__" not in e for e in dashboard_exprs(dashboard, substitute=True))


def test_dashboard_panels_use_the_datasource_variable():
    dashboard = load_dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${ds}"
        assert all(t["datasource"]["uid"] == "${ds}" for t in panel["targets"])
