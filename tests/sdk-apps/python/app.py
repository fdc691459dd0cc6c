"""Baton end-to-end test app using the official Python SDK (PyPI `inngest` 0.5.x) with Flask.

Usage:
    PORT=<port> [APP_ID=baton-py] [TICKER_CRON="0 0 1 1 *"] \
    INNGEST_DEV=1 INNGEST_BASE_URL=http://127.0.0.1:<baton> python app.py

Routes (all on 127.0.0.1:PORT):
    *    /api/inngest     the Inngest SDK handler (GET introspection, PUT sync, POST call)
    GET  /counters        JSON {"<functionId>:<stepName>:<event.data.key|nokey>": <count>}
    GET  /records         JSON {"<name>": [<record>, ...]}  (names: "failures", "ticks")
    POST /counters/reset  clears counters, records and the per-key execution counts of `flaky`

The SDK client is configured only through the environment: INNGEST_DEV (dev mode when
truthy, otherwise cloud mode, which then needs INNGEST_SIGNING_KEY), INNGEST_BASE_URL /
INNGEST_API_BASE_URL / INNGEST_EVENT_API_BASE_URL, INNGEST_SIGNING_KEY, INNGEST_EVENT_KEY...

All handlers are sync (`def`), so the SDK's Flask adapter uses its sync handler; the app is
served by werkzeug's threaded server (no reloader, no debugger).
"""

from __future__ import annotations

import datetime
import time
import os
import sys
import threading
import typing

import flask
import inngest
import inngest.flask
from werkzeug.serving import make_server

PORT_RAW = os.environ.get("PORT", "")
if not PORT_RAW.isdigit():
    print("PORT env var is required (a number)", file=sys.stderr, flush=True)
    sys.exit(2)
PORT = int(PORT_RAW)
APP_ID = os.environ.get("APP_ID") or "baton-py"
TICKER_CRON = os.environ.get("TICKER_CRON") or "0 0 1 1 *"

# Mode (dev/cloud), URLs and keys all come from the INNGEST_* environment variables.
client = inngest.Inngest(app_id=APP_ID)

# ---- in-memory counters and records ---------------------------------------------------

_lock = threading.Lock()
_counters: dict[str, int] = {}
_records: dict[str, list[typing.Any]] = {}
_flaky_executions: dict[str, int] = {}


def key_of(event: inngest.Event) -> str:
    k = (event.data or {}).get("key")
    return "nokey" if k is None else str(k)


def bump(fn_id: str, step_name: str, key: str) -> None:
    """Increment `<fnId>:<stepName>:<key>`; called first thing in every step body."""
    name = f"{fn_id}:{step_name}:{key}"
    with _lock:
        _counters[name] = _counters.get(name, 0) + 1


def record(name: str, value: typing.Any) -> None:
    with _lock:
        _records.setdefault(name, []).append(value)


def _seconds(value: typing.Any, default: int) -> int:
    """Whole seconds >= 1 (the SDK rejects sub-second / fractional durations)."""
    try:
        n = int(round(float(value)))
    except (TypeError, ValueError):
        return default
    return max(n, 1)


# ---- functions ---------------------------------------------------------------------------


@client.create_function(
    fn_id="three-steps",
    trigger=inngest.TriggerEvent(event="test/three-steps"),
)
def three_steps(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)

    def a() -> dict[str, int]:
        bump("three-steps", "a", key)
        return {"n": 1}

    ra = ctx.step.run("a", a)

    def b() -> dict[str, int]:
        bump("three-steps", "b", key)
        return {"n": ra["n"] + 1}

    rb = ctx.step.run("b", b)

    def c() -> dict[str, int]:
        bump("three-steps", "c", key)
        return {"n": rb["n"] + 1}

    rc = ctx.step.run("c", c)
    return {"sum": ra["n"] + rb["n"] + rc["n"], "key": ctx.event.data.get("key")}


@client.create_function(
    fn_id="flaky",
    retries=3,
    trigger=inngest.TriggerEvent(event="test/flaky"),
)
def flaky(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)

    def flaky_step() -> str:
        bump("flaky", "flaky-step", key)
        with _lock:
            n = _flaky_executions.get(key, 0) + 1
            _flaky_executions[key] = n
        if n <= 2:
            raise Exception(f"flaky failure {n}")
        return f"ok after {n}"

    return ctx.step.run("flaky-step", flaky_step)


@client.create_function(
    fn_id="non-retriable",
    trigger=inngest.TriggerEvent(event="test/non-retriable"),
)
def non_retriable(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)

    def boom() -> None:
        bump("non-retriable", "boom", key)
        raise inngest.NonRetriableError("do not retry")

    ctx.step.run("boom", boom)
    return "unreachable"


@client.create_function(
    fn_id="wait-match",
    trigger=inngest.TriggerEvent(event="test/wait"),
)
def wait_match(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)

    def before() -> str:
        bump("wait-match", "before", key)
        return "before"

    ctx.step.run("before", before)
    got = ctx.step.wait_for_event(
        "wait",
        event="test/wait.reply",
        if_exp="event.data.key == async.data.key",
        timeout=datetime.timedelta(seconds=_seconds(ctx.event.data.get("timeout"), 10)),
    )

    def after() -> str:
        bump("wait-match", "after", key)
        return "after"

    ctx.step.run("after", after)
    return {"received": dict(got.data) if got is not None else None}


@client.create_function(
    fn_id="wait-if",
    trigger=inngest.TriggerEvent(event="test/wait-if"),
)
def wait_if(ctx: inngest.ContextSync) -> typing.Any:
    got = ctx.step.wait_for_event(
        "wait",
        event="test/wait-if.reply",
        if_exp="event.data.key == async.data.key && async.data.ok == true",
        timeout=datetime.timedelta(seconds=10),
    )
    return {"received": dict(got.data) if got is not None else None}


@client.create_function(
    fn_id="invokee",
    trigger=inngest.TriggerEvent(event="test/invokee"),
)
def invokee(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)
    mode = ctx.event.data.get("mode")
    if mode == "slow":
        ctx.step.sleep("slow-nap", datetime.timedelta(seconds=30))
    if mode == "nap":
        ctx.step.sleep("nap", datetime.timedelta(seconds=1))

    def work() -> dict[str, str]:
        bump("invokee", "work", key)
        if mode == "fail":
            raise inngest.NonRetriableError("invokee failed")
        return {"doubled": key + key}

    return ctx.step.run("work", work)


@client.create_function(
    fn_id="invoker",
    trigger=inngest.TriggerEvent(event="test/invoke"),
)
def invoker(ctx: inngest.ContextSync) -> typing.Any:
    data = ctx.event.data
    try:
        result = ctx.step.invoke(
            "call",
            function=invokee,
            data={"key": data.get("key"), "mode": data.get("mode")},
            timeout=datetime.timedelta(seconds=_seconds(data.get("timeout"), 20)),
        )
        return {"result": result}
    except inngest.StepError as err:
        # A failed / timed-out invoke is memoized by the server as {"error": {...}} and
        # re-raised by the SDK as inngest.StepError carrying the server's name/message
        # (e.g. name "InngestInvokeTimeoutError" on timeout).
        return {"error": err.message, "name": err.name, "class": type(err).__name__}


@client.create_function(
    fn_id="parallel-invoke",
    retries=0,
    trigger=inngest.TriggerEvent(event="test/parallel-invoke"),
)
def parallel_invoke(ctx: inngest.ContextSync) -> typing.Any:
    """A parallel group of an invoke (whose callee naps 1 s), two step.runs and a
    send_event; the counter `parallel-invoke:call:<key>` counts the calls."""
    key = key_of(ctx.event)
    bump("parallel-invoke", "call", key)

    def make(name: str, value: int) -> typing.Callable[[], int]:
        def body() -> int:
            bump("parallel-invoke", name, key)
            return value

        return lambda: ctx.step.run(name, body)

    results = ctx.group.parallel(
        (
            lambda: ctx.step.invoke("invoke", function=invokee, data={"key": key, "mode": "nap"}),
            make("p1", 1),
            make("p2", 2),
            lambda: ctx.step.send_event("send", events=inngest.Event(name="test/noop")),
        )
    )

    def after() -> None:
        bump("parallel-invoke", "after", key)

    ctx.step.run("after", after)
    return {"invoked": results[0], "sum": results[1] + results[2]}


@client.create_function(
    fn_id="parallel",
    trigger=inngest.TriggerEvent(event="test/parallel"),
)
def parallel(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)

    def make(name: str, value: int) -> typing.Callable[[], int]:
        def body() -> int:
            bump("parallel", name, key)
            return value

        return lambda: ctx.step.run(name, body)

    results = ctx.group.parallel((make("p1", 1), make("p2", 2), make("p3", 3)))

    def after() -> int:
        bump("parallel", "after", key)
        return sum(results)

    ctx.step.run("after", after)
    return {"sum": 6}


@client.create_function(
    fn_id="cancellable",
    trigger=inngest.TriggerEvent(event="test/cancellable"),
    cancel=[
        inngest.Cancel(event="test/cancel", if_exp="event.data.key == async.data.key"),
    ],
)
def cancellable(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)

    def before() -> str:
        bump("cancellable", "before", key)
        return "before"

    ctx.step.run("before", before)
    ctx.step.sleep("long", datetime.timedelta(seconds=30))

    def after() -> str:
        bump("cancellable", "after", key)
        return "after"

    ctx.step.run("after", after)
    return "not cancelled"


def fails_handled_on_failure(ctx: inngest.ContextSync) -> typing.Any:
    # ctx.event is the `inngest/function.failed` event: data.event = the original
    # triggering event, data.error = {"error", "name", "message", "stack"?} from the server.
    data = ctx.event.data or {}
    original = data.get("event") or {}
    orig_data = original.get("data") if isinstance(original, dict) else None
    orig_key = (orig_data or {}).get("key") if isinstance(orig_data, dict) else None
    error = data.get("error") or {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    key = "nokey" if orig_key is None else str(orig_key)

    def on_failure_step() -> dict[str, typing.Any]:
        bump("fails-handled", "on-failure", key)
        rec = {
            "key": orig_key,
            "message": error.get("message"),
            "name": error.get("name"),
        }
        record("failures", rec)
        return rec

    return ctx.step.run("on-failure", on_failure_step)


@client.create_function(
    fn_id="fails-handled",
    retries=0,
    on_failure=fails_handled_on_failure,
    trigger=inngest.TriggerEvent(event="test/fails-handled"),
)
def fails_handled(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)

    def boom() -> None:
        bump("fails-handled", "boom", key)
        raise Exception("handled failure")

    ctx.step.run("boom", boom)
    return "unreachable"


@client.create_function(
    fn_id="ticker",
    trigger=inngest.TriggerCron(cron=TICKER_CRON),
)
def ticker(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)
    ev = ctx.event

    def tick() -> dict[str, typing.Any]:
        bump("ticker", "tick", key)
        rec = {"name": ev.name, "data": dict(ev.data), "id": ev.id}
        record("ticks", rec)
        return rec

    return ctx.step.run("tick", tick)


@client.create_function(
    fn_id="expression",
    trigger=inngest.TriggerEvent(event="test/expr", expression="event.data.n > 10"),
)
def expression(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)

    def big() -> typing.Any:
        bump("expression", "big", key)
        return ctx.event.data.get("n")

    return ctx.step.run("big", big)


def _parse_until(value: typing.Any) -> datetime.datetime:
    if isinstance(value, str) and value:
        dt = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.timezone.utc)
        return dt
    # No/invalid `until`: one second from now.
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)


@client.create_function(
    fn_id="sleepy",
    trigger=inngest.TriggerEvent(event="test/sleepy"),
)
def sleepy(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)
    ctx.step.sleep("short", datetime.timedelta(seconds=1))
    ctx.step.sleep_until("until", _parse_until(ctx.event.data.get("until")))

    def done() -> str:
        bump("sleepy", "done", key)
        return "awake"

    return ctx.step.run("done", done)


@client.create_function(
    fn_id="ten-steps",
    trigger=inngest.TriggerEvent(event="test/ten-steps"),
    # Generous limits: only here so the registered config carries a `timeouts` object.
    timeouts=inngest.Timeouts(
        start=datetime.timedelta(minutes=10),
        finish=datetime.timedelta(hours=1),
    ),
)
def ten_steps(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)
    for i in range(1, 11):
        name = f"s{i}"

        def body(name: str = name, i: int = i) -> int:
            bump("ten-steps", name, key)
            return i

        ctx.step.run(name, body)
    return {"done": 10}


@client.create_function(
    fn_id="debounced",
    trigger=inngest.TriggerEvent(event="test/debounce"),
    debounce=inngest.Debounce(key="event.data.key", period=datetime.timedelta(seconds=2)),
)
def debounced(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)

    def seen() -> typing.Any:
        bump("debounced", "seen", key)
        record("debounced", {"key": key, "n": ctx.event.data.get("n")})
        return ctx.event.data.get("n")

    return ctx.step.run("seen", seen)


@client.create_function(
    fn_id="one-at-a-time",
    trigger=inngest.TriggerEvent(event="test/one-at-a-time"),
    concurrency=[inngest.Concurrency(limit=1)],
)
def one_at_a_time(ctx: inngest.ContextSync) -> typing.Any:
    key = key_of(ctx.event)

    def work() -> str:
        bump("one-at-a-time", "work", key)
        started = time.time()
        time.sleep(0.3)
        record("one-at-a-time", {"key": key, "start": started, "end": time.time()})
        return "done"

    return ctx.step.run("work", work)


# ---- flow control, as the Node app's `flow/*` functions (tests/it/flow.rs) ----------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _timed_work(name: str, ctx: inngest.ContextSync, ms: int) -> int:
    bump(name, "work", key_of(ctx.event))
    start = _now_ms()
    time.sleep(ms / 1000)
    end = _now_ms()
    data = ctx.event.data or {}
    record(name, {"key": key_of(ctx.event), "user": data.get("user"), "start": start, "end": end})
    return end - start


@client.create_function(
    fn_id="limited",
    trigger=inngest.TriggerEvent(event="flow/limited"),
    concurrency=[inngest.Concurrency(limit=1)],
)
def limited(ctx: inngest.ContextSync) -> typing.Any:
    ms = int((ctx.event.data or {}).get("ms") or 300)
    return ctx.step.run("work", lambda: _timed_work("limited", ctx, ms))


@client.create_function(
    fn_id="keyed-limit",
    trigger=inngest.TriggerEvent(event="flow/keyed"),
    concurrency=[inngest.Concurrency(limit=1, key="event.data.user")],
)
def keyed_limit(ctx: inngest.ContextSync) -> typing.Any:
    return ctx.step.run("work", lambda: _timed_work("keyed-limit", ctx, 400))


@client.create_function(
    fn_id="throttled",
    trigger=inngest.TriggerEvent(event="flow/throttled"),
    throttle=inngest.Throttle(limit=1, period=datetime.timedelta(seconds=1)),
)
def throttled(ctx: inngest.ContextSync) -> typing.Any:
    def start() -> str:
        bump("throttled", "start", key_of(ctx.event))
        record("throttled", {"key": key_of(ctx.event), "at": _now_ms()})
        return "started"

    return ctx.step.run("start", start)


@client.create_function(
    fn_id="rate-limited",
    trigger=inngest.TriggerEvent(event="flow/rate-limited"),
    rate_limit=inngest.RateLimit(
        limit=1, period=datetime.timedelta(minutes=1), key="event.data.key"
    ),
)
def rate_limited(ctx: inngest.ContextSync) -> typing.Any:
    def work() -> str:
        bump("rate-limited", "work", key_of(ctx.event))
        return "ran"

    return ctx.step.run("work", work)


@client.create_function(
    fn_id="idempotent",
    trigger=inngest.TriggerEvent(event="flow/idempotent"),
    idempotency="event.data.order",
)
def idempotent(ctx: inngest.ContextSync) -> typing.Any:
    def work() -> str:
        bump("idempotent", "work", key_of(ctx.event))
        return "ran"

    return ctx.step.run("work", work)


@client.create_function(
    fn_id="batched",
    trigger=inngest.TriggerEvent(event="flow/batch"),
    batch_events=inngest.Batch(max_size=5, timeout=datetime.timedelta(seconds=3)),
)
def batched(ctx: inngest.ContextSync) -> typing.Any:
    def total() -> list[typing.Any]:
        ns = [(e.data or {}).get("n") for e in ctx.events]
        record("batched", {"size": len(ctx.events), "ns": ns})
        return ns

    return ctx.step.run("sum", total)


@client.create_function(
    fn_id="prioritized",
    trigger=inngest.TriggerEvent(event="flow/priority"),
    concurrency=[inngest.Concurrency(limit=1)],
    priority=inngest.Priority(run="event.data.p"),
)
def prioritized(ctx: inngest.ContextSync) -> typing.Any:
    def work() -> str:
        record("prioritized", key_of(ctx.event))
        time.sleep(int((ctx.event.data or {}).get("ms") or 50) / 1000)
        return key_of(ctx.event)

    return ctx.step.run("work", work)


def _singleton(fn_id: str, ctx: inngest.ContextSync) -> str:
    def first() -> str:
        bump(fn_id, "first", key_of(ctx.event))
        return "first"

    ctx.step.run("first", first)
    ctx.step.sleep("hold", datetime.timedelta(seconds=2))
    return "done"


@client.create_function(
    fn_id="singleton-skip",
    trigger=inngest.TriggerEvent(event="flow/singleton-skip"),
    singleton=inngest.Singleton(mode="skip", key="event.data.user"),
)
def singleton_skip(ctx: inngest.ContextSync) -> typing.Any:
    return _singleton("singleton-skip", ctx)


@client.create_function(
    fn_id="singleton-cancel",
    trigger=inngest.TriggerEvent(event="flow/singleton-cancel"),
    singleton=inngest.Singleton(mode="cancel", key="event.data.user"),
)
def singleton_cancel(ctx: inngest.ContextSync) -> typing.Any:
    return _singleton("singleton-cancel", ctx)


# The same debounce as the Node app's, on its event name.
@client.create_function(
    fn_id="flow-debounced",
    trigger=inngest.TriggerEvent(event="flow/debounce"),
    debounce=inngest.Debounce(key="event.data.key", period=datetime.timedelta(seconds=2)),
)
def flow_debounced(ctx: inngest.ContextSync) -> typing.Any:
    return ctx.step.run("seen", lambda: (ctx.event.data or {}).get("n"))


functions = [
    limited,
    keyed_limit,
    throttled,
    rate_limited,
    idempotent,
    batched,
    prioritized,
    singleton_skip,
    singleton_cancel,
    flow_debounced,
    debounced,
    one_at_a_time,
    three_steps,
    flaky,
    non_retriable,
    wait_match,
    wait_if,
    invokee,
    invoker,
    parallel,
    parallel_invoke,
    cancellable,
    fails_handled,
    ticker,
    expression,
    sleepy,
    ten_steps,
]

# ---- HTTP app ------------------------------------------------------------------------------

app = flask.Flask(__name__)
inngest.flask.serve(app, client, functions)  # at the default path /api/inngest


@app.get("/counters")
def get_counters() -> flask.Response:
    with _lock:
        return flask.jsonify(dict(_counters))


@app.get("/records")
def get_records() -> flask.Response:
    with _lock:
        return flask.jsonify({k: list(v) for k, v in _records.items()})


@app.post("/counters/reset")
def reset_counters() -> flask.Response:
    with _lock:
        _counters.clear()
        _records.clear()
        _flaky_executions.clear()
    return flask.jsonify({"ok": True})


def main() -> None:
    server = make_server("127.0.0.1", PORT, app, threaded=True)
    print(f"app listening on {PORT}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
