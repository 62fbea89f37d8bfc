"""The load generator against a real local HTTP server of known capacity: bounds,
rates, error accounting, open-loop latency, health polling."""
import time

import pytest

from kennel_ops.load.client import Target, run_closed_loop, run_open_loop, server_timing, wait_until_healthy
from kennel_ops.load.payloads import PHOTO_SIZE, dog_photos, load_photos
from kennel_ops.load.stats import summarize
from loadtest_server import CapacityServer

PAYLOADS = [b"x" * 1000, b"y" * 2000]


def test_dog_photos_are_photo_sized_jpegs(tmp_path):
    from PIL import Image
    import io

    photos = dog_photos(3, seed=1)
    assert len(set(photos)) == 3
    for data in photos:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.size == PHOTO_SIZE
        assert 10_000 < len(data) < 200_000
    for i, data in enumerate(photos):
        (tmp_path / f"{i}.jpg").write_bytes(data)
    assert load_photos(tmp_path) == photos
    (tmp_path / "broken.jpg").write_bytes(photos[0][:500])
    with pytest.raises(Exception):
        load_photos(tmp_path)
    with pytest.raises(ValueError, match="no .jpg"):
        load_photos(tmp_path / "missing")


def test_closed_loop_stops_at_the_request_count():
    with CapacityServer(slots=4, service_s=0.001) as server:
        run = run_closed_loop(Target(server.url), PAYLOADS, concurrency=3, duration_s=30, max_requests=40)
    assert len(run.outcomes) == 40 == server.count
    assert all(o.ok for o in run.outcomes)
    assert run.elapsed < 10
    # payloads are cycled: both bodies reached the server
    assert set(server.bodies) == {1000, 2000}


def test_closed_loop_stops_at_the_duration_even_when_answers_are_slow():
    with CapacityServer(slots=1, service_s=0.3) as server:
        began = time.monotonic()
        run = run_closed_loop(Target(server.url), PAYLOADS, concurrency=2, duration_s=0.5, max_requests=10_000)
        took = time.monotonic() - began
    # at most one request per client is in flight at the deadline; the slot serialises them
    assert took < 0.5 + 2 * 0.3 + 0.5
    assert 1 <= len(run.outcomes) <= 4


def test_closed_loop_throughput_matches_the_server_capacity():
    # 2 slots x 100 ms = 20 requests/s at most (sleep-bound, so a busy host barely
    # moves it); 4 clients keep both slots busy and each waits about one service time.
    with CapacityServer(slots=2, service_s=0.1) as server:
        step = summarize(run_closed_loop(Target(server.url), PAYLOADS, concurrency=4, duration_s=3.0,
                                         max_requests=10_000))
    assert step.success_rate == 1.0
    assert 14 <= step.throughput <= 20.5
    assert 0.15 <= step.p50 <= 0.3


def test_errors_are_counted_by_kind_and_excluded_from_latency():
    with CapacityServer(slots=4, service_s=0.001, fail_every=5) as server:
        step = summarize(run_closed_loop(Target(server.url), PAYLOADS, concurrency=2, duration_s=30,
                                         max_requests=50))
    assert step.requests == 50
    assert step.errors == {"http 503": 10}
    assert step.successes == 40 and step.success_rate == 0.8


def test_timeouts_and_refused_connections_are_errors_not_crashes():
    with CapacityServer(hang_s=1.0) as server:
        run = run_closed_loop(Target(server.url, timeout_s=0.2), PAYLOADS, concurrency=1, duration_s=0.3,
                              max_requests=5)
    assert run.outcomes and all(o.error == "timeout" for o in run.outcomes)

    with CapacityServer() as server:
        url = server.url
    run = run_closed_loop(Target(url), PAYLOADS, concurrency=1, duration_s=5, max_requests=3)
    assert [o.error for o in run.outcomes] == ["connection refused"] * 3


def test_open_loop_holds_the_rate_below_capacity():
    # capacity 20/s, offered 10/s: requests rarely wait, latency stays near the 100 ms service time
    with CapacityServer(slots=2, service_s=0.1) as server:
        run = run_open_loop(Target(server.url), PAYLOADS, rate=10, duration_s=2.0, clients=8)
    step = summarize(run)
    assert step.requests == 20 and step.success_rate == 1.0
    starts = [o.start for o in run.outcomes]
    assert starts[0] == 0 and starts[-1] == pytest.approx(19 / 10)
    assert 8 <= step.throughput <= 10.5
    assert 0.1 <= step.p50 < 0.2 and step.p99 < 0.4


def test_open_loop_counts_the_wait_of_requests_the_server_falls_behind_on():
    # capacity 10/s, offered 20/s: a closed loop would report ~100 ms; from the
    # scheduled time the backlog grows to ~1 s over 2 s of offered load.
    with CapacityServer(slots=1, service_s=0.1) as server:
        step = summarize(run_open_loop(Target(server.url), PAYLOADS, rate=20, duration_s=2.0, clients=64))
    assert step.success_rate == 1.0
    assert step.latency["max"] > 0.8
    assert step.p50 > 0.4


def test_server_timing_header():
    assert server_timing("worker;dur=43.5") == pytest.approx(0.0435)
    assert server_timing('db;dur=2, worker ; desc="model" ; dur="7"') == pytest.approx(0.007)
    assert server_timing("db;dur=2") is None
    for bad in (None, "", "worker", "worker;dur=", "worker;dur=x", "worker;dur=-1", "worker;dur=nan"):
        assert server_timing(bad) is None, bad


def test_bounds_are_validated():
    target = Target("http://127.0.0.1:9/invocations")
    with pytest.raises(ValueError):
        run_closed_loop(target, PAYLOADS, concurrency=0, duration_s=1, max_requests=1)
    with pytest.raises(ValueError):
        run_closed_loop(target, PAYLOADS, concurrency=1, duration_s=0, max_requests=1)
    with pytest.raises(ValueError):
        run_open_loop(target, PAYLOADS, rate=0, duration_s=1)
    with pytest.raises(ValueError, match="not an http"):
        Target("file:///etc/passwd")
    assert Target("http://127.0.0.1:8080/invocations").with_path("/ping").url == "http://127.0.0.1:8080/ping"


def test_wait_until_healthy():
    with CapacityServer() as server:
        ping = Target(server.url).with_path("/ping")
        assert wait_until_healthy(ping, timeout_s=5) < 1
        missing = Target(server.url).with_path("/nothing")
        with pytest.raises(TimeoutError, match="http 404"):
            wait_until_healthy(missing, timeout_s=0.6, interval_s=0.1)
