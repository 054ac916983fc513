"""A real Prometheus (Debian's /usr/bin/prometheus) scrapes the server's /metrics every second;
its HTTP API returns the service's series with the values the server exposes."""

import json
import os
import signal
import subprocess
import urllib.error
import urllib.parse

import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb

PROMETHEUS = "/usr/bin/prometheus"


def query(port, expr):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        status, body = lib.http_get(url)
    except urllib.error.URLError:  # still starting: not listening yet
        return None
    if status != 200:
        return None
    doc = json.loads(body)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def test_prometheus_scrapes_metrics(r50_server, goldens, tmp_path):
    assert os.access(PROMETHEUS, os.X_OK), "Debian package prometheus is not installed"
    server = r50_server
    case = goldens.cases["crop_smooth_2"]
    server.embed([goldens.face(case)])  # at least one face counted
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    m = server.metrics()
    faces = m.get("arcface_faces_total")
    ok = m.get("arcface_requests_total", rpc="Embed", code="OK")
    assert faces >= 1

    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: arcface\n    scrape_interval: 1s\n    scrape_timeout: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.http_port}']\n")
    port = lib.free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        lib.orphan_guarded([PROMETHEUS, f"--config.file={config}",
                            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]),
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log_tail():
        return (tmp_path / "prometheus.log").read_text(errors="replace")[-4000:]

    try:
        def scraped():
            assert proc.poll() is None, f"prometheus exited {proc.returncode}:\n{log_tail()}"
            r = query(port, "arcface_faces_total")
            return r if r else None

        result = lib.wait_until(scraped, 60, interval=0.5, what="arcface_faces_total in Prometheus")
        assert len(result) == 1
        series = result[0]
        assert series["metric"]["__name__"] == "arcface_faces_total"
        assert series["metric"]["job"] == "arcface"
        assert series["metric"]["instance"] == f"127.0.0.1:{server.http_port}"
        assert float(series["value"][1]) == faces

        r = query(port, 'arcface_requests_total{rpc="Embed",code="OK"}')
        assert len(r) == 1 and float(r[0]["value"][1]) == ok
        r = query(port, "arcface_model_info")
        assert len(r) == 1
        labels = r[0]["metric"]
        assert labels["model_id"] == info.model_id
        assert labels["arch"] == "r50" and labels["device"] == "cpu"
        assert labels["precision"] == "fp32"
        assert float(r[0]["value"][1]) == 1
        r = query(port, 'up{job="arcface"}')
        assert len(r) == 1 and float(r[0]["value"][1]) == 1
        # Histograms arrive whole: the +Inf bucket equals the count.
        inf = query(port, 'arcface_batch_size_bucket{le="+Inf"}')
        count = query(port, "arcface_batch_size_count")
        assert len(inf) == 1 and inf[0]["value"][1] == count[0]["value"][1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                pytest.fail(f"prometheus did not stop on SIGTERM:\n{log_tail()}")
        log.close()
    assert proc.returncode == 0, log_tail()
