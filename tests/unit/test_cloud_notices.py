"""Cloud detection from local facts, each provider's notice watcher against its fake metadata server,
bad answers logged once and ignored, identity documents, and no packet to the metadata address off-cloud."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

import elastictrain as et
from elastictrain.events import check
from elastictrain.fleet.clouds import AZURE_ASSET_TAG, Cloud, detect_cloud, from_labels, read_dmi
from elastictrain.fleet.notice_watch import ENDPOINT_ENV, NoticeWatch, notice_endpoint, start_notice_watch
from elastictrain.fleet.notices import AwsWatcher, AzureWatcher, GcpWatcher
from elastictrain.testing.metadata import FakeAwsMetadata, FakeAzureMetadata, FakeGcpMetadata

LOGGER = "elastictrain.fleet.notices"


def _dmi(tmp_path, **files):
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")
    return tmp_path


@pytest.fixture
def aws():
    with FakeAwsMetadata() as server:
        yield server


@pytest.fixture
def gcp():
    with FakeGcpMetadata() as server:
        yield server


@pytest.fixture
def azure():
    with FakeAzureMetadata() as server:
        yield server


def _problem_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "ignored" in r.getMessage()]


# --- which cloud ------------------------------------------------------------------------------------


@pytest.mark.parametrize("files, provider", [
    ({"sys_vendor": "Amazon EC2", "product_name": "m5.large"}, "aws"),
    ({"bios_vendor": "Amazon EC2"}, "aws"),
    ({"sys_vendor": "Google", "product_name": "Google Compute Engine"}, "gcp"),
    ({"product_name": "Google Compute Engine"}, "gcp"),
    ({"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": AZURE_ASSET_TAG}, "azure"),
    ({"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": "1234-5678"}, None),  # Hyper-V, not Azure
    ({"sys_vendor": "Dell Inc.", "product_name": "PowerEdge R750"}, None),
    ({}, None),
])
def test_the_cloud_is_read_from_dmi_strings(tmp_path, files, provider):
    cloud = detect_cloud("auto", {}, _dmi(tmp_path, **files))
    assert (cloud.provider if cloud else None) == provider
    if cloud:
        assert cloud.source.startswith("dmi:")


def test_labels_come_before_dmi_and_a_setting_before_both(tmp_path):
    root = _dmi(tmp_path, sys_vendor="Amazon EC2")
    assert detect_cloud("auto", {"provider": "GCP"}, root) == Cloud("gcp", "label:provider")
    assert detect_cloud("auto", {"cloud": "Microsoft"}, root).provider == "azure"
    assert detect_cloud("auto", {"eks.amazonaws.com/nodegroup": "spot"}, tmp_path / "none").provider == "aws"
    assert detect_cloud("azure", {"provider": "gcp"}, root) == Cloud("azure", "setting")
    assert detect_cloud("off", {"provider": "aws"}, root) is None
    # a provider label naming a cloud without notices (a neocloud) leaves the DMI to decide
    assert detect_cloud("auto", {"provider": "lambda"}, root) == Cloud("aws", "dmi:sys_vendor")
    assert from_labels({"region": "us-east-1"}) is None


def test_an_unknown_node_gets_no_watcher(tmp_path):
    events, left = [], []
    config = et.NoticeConfig(dmi_root=str(_dmi(tmp_path, sys_vendor="QEMU")))
    assert start_notice_watch(config, {"provider": "onprem"}, events.append, left.append, environ={}) is None
    config = et.NoticeConfig(cloud="off", endpoint="http://127.0.0.1:9")
    assert start_notice_watch(config, {"provider": "aws"}, events.append, left.append, environ={}) is None
    assert read_dmi(tmp_path / "missing") == {}


def test_notice_config_validation_says_the_fix():
    with pytest.raises(ValueError, match="use 'auto', 'off', 'aws', 'gcp' or 'azure'"):
        et.NoticeConfig(cloud="amazon")
    with pytest.raises(ValueError, match="give a base URL"):
        et.NoticeConfig(endpoint="169.254.169.254/latest")
    with pytest.raises(ValueError, match="may not take longer than 10 s"):
        et.NoticeConfig(timeout_s=30)
    config = et.FailureConfig(notices=et.NoticeConfig(cloud="aws", endpoint="http://127.0.0.1:8080"))
    assert config.notices.poll_interval_s == 1.0 and not config.notices.leave_on_rebalance
    assert notice_endpoint(config.notices, "aws", {}) == "http://127.0.0.1:8080"
    assert notice_endpoint(config.notices, "aws", {ENDPOINT_ENV: "http://127.0.0.1:9"}) == "http://127.0.0.1:9"
    assert notice_endpoint(et.NoticeConfig(), "gcp", {}) == "http://metadata.google.internal"


# --- AWS ----------------------------------------------------------------------------------------------


def test_aws_spot_interruption_with_its_warning(aws):
    watcher = AwsWatcher(aws.url, timeout_s=2)
    assert watcher.poll() is None
    deadline = aws.interrupt("terminate", in_s=120)
    notice = watcher.poll()
    assert notice.provider == "aws" and notice.notice == "spot_terminate" and notice.leave
    assert notice.deadline == deadline and 118 <= notice.warning_s <= 120
    assert aws.tokens_issued == 1  # the session token is reused across polls


def test_aws_rebalance_is_reported_and_leaves_only_when_configured(aws):
    aws.recommend_rebalance()
    soft = AwsWatcher(aws.url, timeout_s=2).poll()
    assert soft.notice == "rebalance" and not soft.leave and soft.warning_s is None
    assert AwsWatcher(aws.url, timeout_s=2, leave_on_rebalance=True).poll().leave
    aws.interrupt("stop", in_s=60)
    assert AwsWatcher(aws.url, timeout_s=2).poll().notice == "spot_stop"  # the interruption comes first


def test_aws_token_refused_once_is_renewed_silently(aws, caplog):
    watcher = AwsWatcher(aws.url, timeout_s=2)
    assert watcher.poll() is None and aws.tokens_issued == 1
    aws.expire_tokens()
    aws.interrupt(in_s=100)
    with caplog.at_level(logging.WARNING, LOGGER):
        assert watcher.poll().notice == "spot_terminate"
    assert aws.tokens_issued == 2 and _problem_lines(caplog) == []


def test_aws_wrong_tokens_garbage_and_server_errors_are_logged_once_and_ignored(aws, caplog):
    watcher = AwsWatcher(aws.url, timeout_s=2)
    with caplog.at_level(logging.WARNING, LOGGER):
        aws.refuse_tokens = True
        assert [watcher.poll() for _ in range(3)] == [None] * 3
        aws.refuse_tokens = False
        aws.serve_garbage()
        assert [watcher.poll() for _ in range(3)] == [None] * 3
        aws.serve_garbage(False)
        aws.fail_with(503)
        assert [watcher.poll() for _ in range(3)] == [None] * 3
        aws.fail_with(None)
        aws.interrupt(in_s=90)
        assert watcher.poll().notice == "spot_terminate"  # it kept polling through all of that
    lines = _problem_lines(caplog)
    assert len(lines) == 3, lines
    assert "token refused" in lines[0] and "garbage JSON" in lines[1] and "server error" in lines[2]
    assert watcher.problems.counts["garbage JSON"] == 6  # both paths, three polls: counted, logged once


def test_aws_wrong_shaped_json_is_ignored(aws, caplog):
    aws.action = {"action": "explode", "time": "soon"}
    with caplog.at_level(logging.WARNING, LOGGER):
        watcher = AwsWatcher(aws.url, timeout_s=2)
        assert watcher.poll() is None and watcher.poll() is None
    assert len(_problem_lines(caplog)) == 1 and "wrong-shaped" in _problem_lines(caplog)[0]


def test_a_slow_service_times_out_and_a_closed_port_is_refused(aws, caplog):
    aws.slow(5.0)  # far beyond the watcher's timeout; close() ends the server's wait
    watcher = AwsWatcher(aws.url, timeout_s=0.2)
    with caplog.at_level(logging.WARNING, LOGGER):
        assert watcher.poll() is None and watcher.poll() is None
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        refused = AwsWatcher(f"http://127.0.0.1:{port}", timeout_s=0.5)
        assert refused.poll() is None and refused.poll() is None
    lines = _problem_lines(caplog)
    assert len(lines) == 2 and "timeout" in lines[0] and "connection refused" in lines[1], lines


def test_aws_identity_document(aws):
    identity = AwsWatcher(aws.url, timeout_s=2).fetch_identity()
    assert identity["provider"] == "aws" and identity["document"] == aws.document
    assert identity["signature"] and identity["pkcs7"]
    aws.fail_with(500)
    assert AwsWatcher(aws.url, timeout_s=2).fetch_identity() is None  # never raises


# --- GCP ----------------------------------------------------------------------------------------------


def test_gcp_preemption_and_maintenance(gcp):
    watcher = GcpWatcher(gcp.url, timeout_s=2)
    assert watcher.poll() is None
    gcp.maintenance = "MIGRATE_ON_HOST_MAINTENANCE"
    migrate = watcher.poll()
    assert migrate.notice == "maintenance_migrate" and not migrate.leave
    gcp.maintenance = "TERMINATE_ON_HOST_MAINTENANCE"
    assert watcher.poll().leave
    gcp.preempt()
    notice = watcher.poll()
    assert notice.notice == "preempted" and notice.leave and notice.warning_s == pytest.approx(30.0)


def test_gcp_answers_without_the_flavor_header_or_with_garbage_are_ignored(gcp, caplog):
    watcher = GcpWatcher(gcp.url, timeout_s=2)
    gcp.preempt()
    with caplog.at_level(logging.WARNING, LOGGER):
        gcp.send_flavor = False  # not the metadata server: its TRUE is not believed
        assert watcher.poll() is None and watcher.poll() is None
        gcp.send_flavor = True
        gcp.serve_garbage()
        assert watcher.poll() is None and watcher.poll() is None
        gcp.fail_with(500)
        assert watcher.poll() is None
    lines = _problem_lines(caplog)
    assert len(lines) == 3 and "Metadata-Flavor" in lines[0] and "unexpected value" in lines[1], lines
    assert "server error" in lines[2]


def test_gcp_identity_token(gcp):
    identity = GcpWatcher(gcp.url, timeout_s=2, audience="https://audit.example").fetch_identity()
    assert identity["audience"] == "https://audit.example" and identity["token"].count(".") == 2
    assert gcp.count("/computeMetadata/v1/instance/service-accounts/default/identity") == 1


# --- Azure --------------------------------------------------------------------------------------------


def test_azure_preempt_for_this_vm_with_its_not_before(azure):
    watcher = AzureWatcher(azure.url, timeout_s=2)
    assert watcher.poll() is None
    azure.schedule("Preempt", in_s=30, resource="another-vm")  # an event of a neighbour: not ours
    assert watcher.poll() is None
    azure.schedule("Freeze", in_s=5)
    azure.schedule("Preempt", in_s=30)
    notice = watcher.poll()
    assert notice.notice == "preempt" and notice.leave and 28 <= notice.warning_s <= 30


def test_azure_wrong_shaped_events_are_ignored(azure, caplog):
    watcher = AzureWatcher(azure.url, timeout_s=2)
    azure.serve_garbage()
    with caplog.at_level(logging.WARNING, LOGGER):
        assert watcher.poll() is None and watcher.poll() is None
    assert len(_problem_lines(caplog)) == 1 and "wrong-shaped" in _problem_lines(caplog)[0]


def test_azure_attested_document(azure):
    identity = AzureWatcher(azure.url, timeout_s=2).fetch_identity(nonce="1234")
    assert identity == {"provider": "azure", "encoding": "pkcs7", "signature": identity["signature"],
                        "nonce": "1234"}
    azure.serve_garbage(False)
    azure.fail_with(404)
    assert AzureWatcher(azure.url, timeout_s=2).fetch_identity() is None


# --- the watcher thread ----------------------------------------------------------------------------


def test_the_watch_emits_each_notice_once_and_asks_to_leave_once(aws):
    events, left = [], []
    aws.recommend_rebalance()
    watch = NoticeWatch(AwsWatcher(aws.url, timeout_s=2), 0.05, events.append, left.append)
    assert watch.poll_once().notice == "rebalance" and watch.poll_once() is None  # reported once
    aws.interrupt(in_s=120)
    assert watch.poll_once().notice == "spot_terminate" and watch.poll_once() is None
    assert [e["notice"] for e in events] == ["rebalance", "spot_terminate"] and len(left) == 1
    for e in events:
        check(e)
    assert events[1]["kind"] == "cloud_notice" and 118 <= events[1]["warning_s"] <= 120


def test_the_watch_thread_leaves_on_a_notice_and_stops(aws):
    left = threading.Event()
    seen = []
    config = et.NoticeConfig(cloud="aws", poll_interval_s=0.05, timeout_s=2)
    watch = start_notice_watch(config, {}, lambda e: None, lambda n: (seen.append(n), left.set()),
                               environ={ENDPOINT_ENV: aws.url})
    try:
        assert watch is not None
        aws.interrupt(in_s=120)
        assert left.wait(10) and seen[0].notice == "spot_terminate"
    finally:
        watch.stop()
    assert not watch._thread.is_alive()


# --- no packet to the metadata address off-cloud -------------------------------------------------------


@pytest.fixture
def connections(monkeypatch):
    """Every address a socket connects to while the test runs; only loopback is really connected."""
    seen: list[str] = []
    real_connect = socket.socket.connect
    real_create = socket.create_connection

    def connect(self, address):
        seen.append(str(address[0]) if isinstance(address, tuple) else str(address))
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise ConnectionRefusedError(f"test: no connection to {address[0]}")
        return real_connect(self, address)

    def create_connection(address, *args, **kwargs):
        seen.append(str(address[0]))
        return real_create(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return seen


def test_off_cloud_the_worker_startup_path_sends_nothing_to_the_metadata_address(connections, tmp_path, aws):
    from elastictrain.fleet.clouds import DEFAULT_DMI_ROOT, from_dmi

    # this machine's own DMI strings when they name no cloud (a laptop, CI), else a non-cloud stand-in
    root = None if from_dmi(read_dmi(DEFAULT_DMI_ROOT)) is None else str(_dmi(tmp_path, sys_vendor="QEMU"))
    config = et.FailureConfig().notices.model_copy(update={"dmi_root": root, "poll_interval_s": 0.01})
    watches = [start_notice_watch(config, labels, lambda e: None, lambda n: None, environ={})
               for labels in ({}, {"region": "eu"}, {"provider": "onprem"})]
    for watch in filter(None, watches):  # none, unless the cloud was guessed: then it polls, and stops
        for _ in range(3):
            watch.poll_once()
        watch.stop()
    assert connections == [] and watches == [None, None, None]
    # the recorder sees what a watch does connect to: here, the fake server on loopback only
    watch = start_notice_watch(config, {"provider": "aws"}, lambda e: None, lambda n: None,
                               environ={ENDPOINT_ENV: aws.url})
    try:
        for _ in range(3):
            watch.poll_once()
    finally:
        watch.stop()
    assert connections and set(connections) == {"127.0.0.1"}
    assert "169.254.169.254" not in connections
