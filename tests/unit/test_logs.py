"""--log-format: one JSON object a line with the record's fields, exceptions as a field, no secrets; and text."""

from __future__ import annotations

import datetime
import io
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gunicorn.config import Config

from extender import logs
from tests.e2e.controlplane import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-t0ken-value"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure() changes the process's root logger and hooks: put them back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = sys.excepthook, threading.excepthook
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks


def configured(log_format: str, level: str = "debug") -> io.StringIO:
    stream = io.StringIO()
    logs.configure(level, log_format, stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_record_is_one_line_with_time_level_logger_message_and_extra_fields(root_logging):
    stream = configured("json")
    logging.getLogger("extender.kube.binder").info(
        "placed %s on %s", "ml/p", "gpu-a", extra={"pod": "ml/p", "node": "gpu-a", "borrowed": True}
    )
    [record] = lines(stream)
    assert record.pop("time").endswith("Z")
    assert record == {
        "level": "info",
        "logger": "extender.kube.binder",
        "message": "placed ml/p on gpu-a",
        "pod": "ml/p",
        "node": "gpu-a",
        "borrowed": True,
    }


def test_the_time_is_utc_with_milliseconds(root_logging):
    stream = configured("json")
    before = datetime.datetime.now(datetime.UTC)
    logging.getLogger("t").warning("x")
    stamp = datetime.datetime.fromisoformat(lines(stream)[0]["time"])
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert abs((stamp - before).total_seconds()) < 5


def test_an_exception_is_a_field_and_the_record_stays_on_one_line(root_logging):
    stream = configured("json")
    try:
        raise ValueError("boom\non two lines")
    except ValueError:
        logging.getLogger("extender.kube.returner").exception("return round failed")
    assert len(stream.getvalue().splitlines()) == 1
    [record] = lines(stream)
    assert record["level"] == "error"
    assert record["message"] == "return round failed"
    assert record["exception_type"] == "ValueError"
    assert record["exception"].startswith("Traceback (most recent call last):")
    assert record["exception"].endswith("ValueError: boom\non two lines")


def test_extra_fields_never_hide_the_core_ones(root_logging):
    stream = configured("json")
    logging.getLogger("t").info("m", extra={"level": "fake", "time": "fake"})
    [record] = lines(stream)
    assert record["level"] == "info" and record["extra_level"] == "fake" and record["extra_time"] == "fake"


@pytest.mark.parametrize("log_format", logs.FORMATS)
def test_tokens_and_credential_fields_are_redacted(root_logging, log_format):
    stream = configured(log_format)
    log = logging.getLogger("urllib3")
    log.debug("sending headers {'Authorization': 'Bearer %s'}", SECRET)
    log.debug("authorization=Basic %s", SECRET)
    log.debug("token as a field", extra={"token": SECRET, "headers": {"Authorization": f"Bearer {SECRET}"}})
    output = stream.getvalue()
    assert SECRET not in output
    assert "Bearer [redacted]" in output and "Basic [redacted]" in output
    if log_format == "json":
        fields = json.loads(output.splitlines()[-1])
        assert fields["token"] == logs.REDACTED
        assert fields["headers"] == {"Authorization": logs.REDACTED}
    assert "basic setup" in logs.redact("basic setup")  # an ordinary word is not a credential


def test_text_lines_are_the_classic_format(root_logging):
    stream = configured("text", level="info")
    logging.getLogger("migchain.returner").info("returner %s started", "a", extra={"pod": "x"})
    logging.getLogger("migchain.returner").debug("not at info")
    [line] = stream.getvalue().splitlines()
    assert line.endswith(" INFO migchain.returner: returner a started")


def test_an_uncaught_exception_in_json_mode_is_logged_as_one_record(root_logging):
    stream = configured("json")
    try:
        raise RuntimeError("the watch died")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    [record] = lines(stream)
    assert record["level"] == "critical"
    assert record["exception_type"] == "RuntimeError"


def test_gunicorn_lines_take_the_format_and_access_lines_carry_fields_not_headers(root_logging, capsys):
    configured("json")
    config = Config()
    config.set("accesslog", "-")
    logger = logs.GunicornLogger(config)
    try:
        logger.info("Listening at: %s", "http://127.0.0.1:8888")

        class Response:
            status = "200 OK"
            sent = 17
            headers = (("Content-Type", "application/json"),)

        environ = {
            "REMOTE_ADDR": "10.0.0.7",
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/filter",
            "RAW_URI": "/filter",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_AUTHORIZATION": f"Bearer {SECRET}",
        }
        request_headers = [("AUTHORIZATION", f"Bearer {SECRET}")]
        logger.access(Response(), request_headers, environ, datetime.timedelta(microseconds=1500))
    finally:
        for log in (logger.error_log, logger.access_log):
            log.handlers.clear()
    captured = capsys.readouterr()
    [error_line] = [json.loads(line) for line in captured.err.splitlines()]
    [access_line] = [json.loads(line) for line in captured.out.splitlines()]
    assert error_line["logger"] == "gunicorn.error"
    assert error_line["message"] == "Listening at: http://127.0.0.1:8888"
    assert access_line["logger"] == "gunicorn.access"
    assert access_line["message"] == "10.0.0.7 POST /filter 200 HTTP/1.1 17B 1.5ms"
    assert {key: access_line[key] for key in ("remote", "method", "path", "status", "bytes", "duration_seconds")} == {
        "remote": "10.0.0.7",
        "method": "POST",
        "path": "/filter",
        "status": 200,
        "bytes": 17,
        "duration_seconds": 0.0015,
    }
    assert SECRET not in captured.out + captured.err


def test_the_real_extender_logs_only_json_lines_gunicorns_included():
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "extender.serve",
            f"--bind=127.0.0.1:{port}",
            f"--health-bind=127.0.0.1:{free_port()}",
            "--log-format=json",
            "--log-level=debug",
            "--chains",
            str(ROOT / "chains" / "a100-40gb.yaml"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/filter",
                data=b'{"Pod": {"metadata": {"name": "p", "uid": "u"}}, "NodeNames": []}',
                headers={"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the extender did not start"
                time.sleep(0.2)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    records = [json.loads(line) for line in output.decode().splitlines()]  # every line is one JSON object
    loggers = {record["logger"] for record in records}
    assert {"gunicorn.error", "gunicorn.access", "migchain.extender"} <= loggers
    [access] = [r for r in records if r["logger"] == "gunicorn.access" and r["path"] == "/filter"][-1:]
    assert access["status"] == 200
    assert SECRET not in output.decode()


def test_the_returner_reports_a_fatal_start_as_one_json_record(tmp_path):
    (tmp_path / "loan.key").write_bytes(b"k" * 32)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "extender.returner_cli",
            "--log-format=json",
            f"--kubeconfig={tmp_path / 'missing'}",
            f"--loan-key-file={tmp_path / 'loan.key'}",
            "--chains",
            str(ROOT / "chains" / "a100-40gb.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    [record] = [json.loads(line) for line in result.stderr.splitlines()]
    assert record["level"] == "critical"
    assert record["exception_type"] == "ConfigException"
    assert "kube-config" in record["message"]
