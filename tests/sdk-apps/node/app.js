// Baton end-to-end / load-benchmark test app using the official `inngest` JS SDK v4.
//
// Usage: PORT=<port> [APP_ID=baton-test] INNGEST_DEV=1 INNGEST_BASE_URL=http://127.0.0.1:<baton> node app.js
//
// Routes (all on 127.0.0.1:PORT):
//   *    /api/inngest     the Inngest SDK handler (GET introspection, PUT sync, POST call)
//   GET  /counters        JSON {"<functionId>:<stepName>:<event.data.key|nokey>": <count>}
//   POST /counters/reset  clears the counters (and the per-key execution counts of `flaky`)
//                         and the records
//   GET  /records         JSON {"<name>": [<value>, ...]} appended by record(name, value)
//   GET  /echo            JSON {"echo": true, "query": {<query params>}} (target of `fetcher`)
//   POST /fake-ai/v1/chat/completions
//                         fake OpenAI-compatible provider for `ai` (records {authorization, body}
//                         under "ai" and answers a fixed chat.completion)
//
// Env: TICKER_CRON sets the cron of `ticker` (default "0 0 1 1 *", i.e. once a year).
//      RECORD_CALLS=1 records {fnId, stepId, runId, jobId} of every call under "calls"
//      (jobId: the x-inngest-job-id header).
//      DROP_REUSED_CONNECTIONS=1 closes a connection, unanswered, when a second call
//      arrives on it: a keep-alive connection the server closes as a request comes in.
//
// The SDK is configured only via environment variables (INNGEST_DEV, INNGEST_BASE_URL,
// INNGEST_SIGNING_KEY, INNGEST_EVENT_KEY, ...). Optional: INNGEST_CHECKPOINTING=0 turns off
// the SDK's default-on checkpointing (`checkpointing: false`); unset keeps the SDK default.

import http from "node:http";
import { Inngest, NonRetriableError, openai } from "inngest";
import { createDefer, scoreMiddleware } from "inngest/experimental";
import { serve } from "inngest/node";

const PORT = process.env.PORT;
if (!PORT || !/^\d+$/.test(PORT)) {
  console.error("PORT env var is required (a number)");
  process.exit(2);
}
const APP_ID = process.env.APP_ID || "baton-test";

const clientOptions = { id: APP_ID };
const cp = process.env.INNGEST_CHECKPOINTING;
if (cp === "0" || cp === "false") clientOptions.checkpointing = false;

const inngest = new Inngest(clientOptions);

// ---- in-memory counters -------------------------------------------------------------

/** @type {Map<string, number>} */
const counters = new Map();
/** executions of `flaky-step` per event.data.key */
/** @type {Map<string, number>} */
const flakyExecutions = new Map();

const keyOf = (event) => {
  const k = event?.data?.key;
  return k === undefined || k === null ? "nokey" : String(k);
};

/** Increment `<fnId>:<stepName>:<key>`; call first thing in every step body. */
const bump = (fnId, stepName, event) => {
  const name = `${fnId}:${stepName}:${keyOf(event)}`;
  counters.set(name, (counters.get(name) ?? 0) + 1);
};

const sleepMs = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- in-memory records ----------------------------------------------------------------

/** @type {Map<string, unknown[]>} */
const records = new Map();

/** Append a JSON value under `name` (served by GET /records). */
const record = (name, value) => {
  let list = records.get(name);
  if (!list) {
    list = [];
    records.set(name, list);
  }
  list.push(value);
};

// ---- functions ----------------------------------------------------------------------
// v4 form: inngest.createFunction({ id, retries?, triggers: [{ event }] }, handler)

const threeSteps = inngest.createFunction(
  { id: "three-steps", triggers: [{ event: "test/three-steps" }] },
  async ({ event, step }) => {
    const a = await step.run("a", () => {
      bump("three-steps", "a", event);
      return { n: 1 };
    });
    const b = await step.run("b", () => {
      bump("three-steps", "b", event);
      return { n: a.n + 1 };
    });
    const c = await step.run("c", () => {
      bump("three-steps", "c", event);
      return { n: b.n + 1 };
    });
    return { sum: a.n + b.n + c.n, key: event.data?.key };
  },
);

const flaky = inngest.createFunction(
  { id: "flaky", retries: 3, triggers: [{ event: "test/flaky" }] },
  async ({ event, step }) => {
    return await step.run("flaky-step", () => {
      bump("flaky", "flaky-step", event);
      const key = keyOf(event);
      const n = (flakyExecutions.get(key) ?? 0) + 1;
      flakyExecutions.set(key, n);
      if (n <= 2) throw new Error("flaky failure");
      return `ok after ${n}`;
    });
  },
);

const nonRetriable = inngest.createFunction(
  { id: "non-retriable", retries: 4, triggers: [{ event: "test/non-retriable" }] },
  async ({ event, step }) => {
    await step.run("boom", () => {
      bump("non-retriable", "boom", event);
      throw new NonRetriableError("do not retry");
    });
  },
);

const alwaysFails = inngest.createFunction(
  { id: "always-fails", retries: 2, triggers: [{ event: "test/always-fails" }] },
  async ({ event, step }) => {
    await step.run("always", () => {
      bump("always-fails", "always", event);
      throw new Error("always fails");
    });
  },
);

const tenSteps = inngest.createFunction(
  { id: "ten-steps", triggers: [{ event: "test/ten-steps" }] },
  async ({ event, step }) => {
    for (let i = 1; i <= 10; i++) {
      const name = `s${i}`;
      await step.run(name, () => {
        bump("ten-steps", name, event);
        return i;
      });
    }
    return { done: 10 };
  },
);

const slowSteps = inngest.createFunction(
  { id: "slow-steps", triggers: [{ event: "test/slow-steps" }] },
  async ({ event, step }) => {
    const raw = Number(event.data?.ms);
    const ms = Number.isFinite(raw) && raw >= 0 ? raw : 500;
    const results = [];
    for (const name of ["slow1", "slow2", "slow3"]) {
      results.push(
        await step.run(name, async () => {
          bump("slow-steps", name, event);
          await sleepMs(ms);
          return name;
        }),
      );
    }
    return results;
  },
);

const sleeper = inngest.createFunction(
  { id: "sleeper", triggers: [{ event: "test/sleeper" }] },
  async ({ event, step }) => {
    await step.run("before", () => {
      bump("sleeper", "before", event);
      return "before";
    });
    await step.sleep("nap", "2s");
    await step.run("after", () => {
      bump("sleeper", "after", event);
      return "after";
    });
    return "slept";
  },
);

// ---- feature functions ----------------------------------------------------------------

const waitMatch = inngest.createFunction(
  { id: "wait-match", triggers: [{ event: "test/wait" }] },
  async ({ event, step }) => {
    await step.run("before", () => {
      bump("wait-match", "before", event);
      return "before";
    });
    const got = await step.waitForEvent("wait", {
      event: "test/wait.reply",
      match: "data.key",
      timeout: event.data?.timeout ?? "10s",
    });
    await step.run("after", () => {
      bump("wait-match", "after", event);
      return "after";
    });
    return { received: got ? got.data : null };
  },
);

const waitIf = inngest.createFunction(
  { id: "wait-if", triggers: [{ event: "test/wait-if" }] },
  async ({ event, step }) => {
    const got = await step.waitForEvent("wait", {
      event: "test/wait-if.reply",
      if: "event.data.key == async.data.key && async.data.ok == true",
      timeout: "10s",
    });
    return { received: got ? got.data : null };
  },
);

// Invoked by `invoker` (step.invoke with the function object); also triggerable directly.
const invokee = inngest.createFunction(
  { id: "invokee", triggers: [{ event: "test/invokee" }] },
  async ({ event, step }) => {
    if (event.data?.mode === "slow") {
      await step.sleep("slow-nap", "30s");
    }
    return await step.run("work", () => {
      bump("invokee", "work", event);
      if (event.data?.mode === "fail") throw new NonRetriableError("invokee failed");
      return { doubled: String(event.data?.key) + String(event.data?.key) };
    });
  },
);

const invoker = inngest.createFunction(
  { id: "invoker", triggers: [{ event: "test/invoke" }] },
  async ({ event, step }) => {
    try {
      const result = await step.invoke("call", {
        function: invokee,
        data: { key: event.data?.key, mode: event.data?.mode },
        timeout: event.data?.timeout ?? "20s",
      });
      return { result };
    } catch (err) {
      return { error: err.message, name: err.name };
    }
  },
);

const parallel = inngest.createFunction(
  { id: "parallel", triggers: [{ event: "test/parallel" }] },
  async ({ event, step }) => {
    const [a, b, c] = await Promise.all([
      step.run("p1", () => {
        bump("parallel", "p1", event);
        return 1;
      }),
      step.run("p2", () => {
        bump("parallel", "p2", event);
        return 2;
      }),
      step.run("p3", () => {
        bump("parallel", "p3", event);
        return 3;
      }),
    ]);
    const sum = await step.run("after", () => {
      bump("parallel", "after", event);
      return a + b + c;
    });
    return { sum };
  },
);

const cancellable = inngest.createFunction(
  {
    id: "cancellable",
    triggers: [{ event: "test/cancellable" }],
    cancelOn: [{ event: "test/cancel", match: "data.key" }],
  },
  async ({ event, step }) => {
    await step.run("before", () => {
      bump("cancellable", "before", event);
      return "before";
    });
    await step.sleep("long", "30s");
    await step.run("after", () => {
      bump("cancellable", "after", event);
      return "after";
    });
    return "not cancelled";
  },
);

// onFailure runs as a separate function "<app>-fails-handled-failure", triggered by
// `inngest/function.failed`; its `event.data.event` is the original triggering event.
const failsHandled = inngest.createFunction(
  {
    id: "fails-handled",
    retries: 0,
    triggers: [{ event: "test/fails-handled" }],
    onFailure: async ({ event, error, step }) => {
      await step.run("on-failure", () => {
        const original = event.data?.event;
        bump("fails-handled", "on-failure", original);
        record("failures", {
          key: original?.data?.key,
          message: error.message,
          name: error.name,
        });
        return "handled";
      });
    },
  },
  async ({ event, step }) => {
    await step.run("boom", () => {
      bump("fails-handled", "boom", event);
      throw new Error("handled failure");
    });
  },
);

const ticker = inngest.createFunction(
  { id: "ticker", triggers: [{ cron: process.env.TICKER_CRON ?? "0 0 1 1 *" }] },
  async ({ event, step }) => {
    await step.run("tick", () => {
      bump("ticker", "tick", event);
      record("ticks", { name: event.name, data: event.data, id: event.id });
      return "tick";
    });
    return "ticked";
  },
);

const expression = inngest.createFunction(
  { id: "expression", triggers: [{ event: "test/expr", if: "event.data.n > 10" }] },
  async ({ event, step }) => {
    return await step.run("big", () => {
      bump("expression", "big", event);
      return event.data?.n;
    });
  },
);

// defer(): `deferred` runs (one per defer) start once a `deferrer` run has ended, whatever
// its outcome. `deferrer` defers "first" at the top, "in-step" inside a step, and "dropped"
// which it aborts after the add has shipped; data.mode "sleep" re-enters the function after a
// sleep (the defers must not be made again), "throw" fails the run after the defers.
// `deferred` records {which, key, parents, runId} under "deferred".
const deferred = createDefer(inngest, { id: "deferred" }, async ({ event, parents, runId, step }) => {
  await step.run("note", () => {
    bump("deferred", "note", event);
    record("deferred", { which: event.data?.which, key: keyOf(event), parents, runId });
  });
  return event.data?.which;
});

const deferrer = inngest.createFunction(
  { id: "deferrer", retries: 0, triggers: [{ event: "test/defer" }] },
  async ({ event, step, defer }) => {
    const key = event.data?.key;
    defer("first", { function: deferred, data: { key, which: "first" } });
    const dropped = defer("dropped", { function: deferred, data: { key, which: "dropped" } });
    await step.run("middle", () => {
      bump("deferrer", "middle", event);
      defer("in-step", { function: deferred, data: { key, which: "in-step" } });
    });
    dropped.abort();
    if (event.data?.mode === "sleep") await step.sleep("nap", event.data?.sleep ?? "1s");
    if (event.data?.mode === "throw") throw new NonRetriableError("failed after deferring");
    return "deferred";
  },
);

const sender = inngest.createFunction(
  { id: "sender", triggers: [{ event: "test/send" }] },
  async ({ event, step }) => {
    await step.sendEvent("send", {
      name: "test/three-steps",
      data: { key: `${event.data?.key}-child` },
    });
    return "sent";
  },
);

// step.fetch outside a step.run becomes a `Gateway` op that the server executes.
const fetcher = inngest.createFunction(
  { id: "fetcher", triggers: [{ event: "test/fetch" }] },
  async ({ step }) => {
    const res = await step.fetch(`http://127.0.0.1:${PORT}/echo?x=1`);
    const body = await res.json();
    return { status: res.status, body };
  },
);

const aiModelOptions = {
  model: "gpt-test",
  baseUrl: `http://127.0.0.1:${PORT}/fake-ai/v1/`,
  apiKey: "sk-test",
};

// step.ai.infer becomes an `AIGateway` op; the server POSTs to the model's url.
const ai = inngest.createFunction(
  { id: "ai", triggers: [{ event: "test/ai" }] },
  async ({ step }) => {
    const out = await step.ai.infer("infer", {
      model: openai(aiModelOptions),
      body: { messages: [{ role: "user", content: "hi" }] },
    });
    return { out };
  },
);

const finishTimeout = inngest.createFunction(
  { id: "finish-timeout", triggers: [{ event: "test/finish-timeout" }], timeouts: { finish: "2s" } },
  async ({ event, step }) => {
    await step.run("before", () => {
      bump("finish-timeout", "before", event);
      return "before";
    });
    await step.sleep("nap", "10s");
    await step.run("after", () => {
      bump("finish-timeout", "after", event);
      return "after";
    });
    return "finished";
  },
);

const BIG_STEP_CHARS = 1_600_000;

const bigState = inngest.createFunction(
  { id: "big-state", triggers: [{ event: "test/big-state" }] },
  async ({ event, step }) => {
    const a = await step.run("big1", () => {
      bump("big-state", "big1", event);
      return "x".repeat(BIG_STEP_CHARS);
    });
    const b = await step.run("big2", () => {
      bump("big-state", "big2", event);
      return "x".repeat(BIG_STEP_CHARS);
    });
    const c = await step.run("big3", () => {
      bump("big-state", "big3", event);
      return "x".repeat(BIG_STEP_CHARS);
    });
    return { lengths: [a.length, b.length, c.length] };
  },
);

const tooBig = inngest.createFunction(
  { id: "too-big", triggers: [{ event: "test/too-big" }] },
  async ({ event, step }) => {
    const huge = await step.run("huge", () => {
      bump("too-big", "huge", event);
      return "x".repeat(5_000_000);
    });
    return { length: huge.length };
  },
);

// event.data.until: an ISO date; falls back to event.ts + 3 s (stable across replays).
const sleepy = inngest.createFunction(
  { id: "sleepy", triggers: [{ event: "test/sleepy" }] },
  async ({ event, step }) => {
    await step.sleep("short", "1s");
    const until = event.data?.until ?? new Date(Number(event.ts) + 3000).toISOString();
    await step.sleepUntil("until", new Date(until));
    return await step.run("done", () => {
      bump("sleepy", "done", event);
      return "awake";
    });
  },
);

// ---- load-benchmark functions (benches/load.rs) ---------------------------------------
// No counters or logging: each runs thousands of times.

const benchSleep = inngest.createFunction(
  { id: "bench-sleep", triggers: [{ event: "bench/sleep" }] },
  async ({ event, step }) => {
    const t0 = await step.run("start", () => Date.now());
    await step.sleep("nap", `${event.data.secs}s`);
    const t1 = await step.run("end", () => Date.now());
    return { t0, t1, secs: event.data.secs };
  },
);

const benchWait = inngest.createFunction(
  { id: "bench-wait", triggers: [{ event: "bench/wait" }] },
  async ({ step }) => {
    const got = await step.waitForEvent("wait", {
      event: "bench/wait.reply",
      match: "data.key",
      timeout: "10m",
    });
    return { got: got ? got.data.key : null };
  },
);

// ---- flow control -----------------------------------------------------------------------

/** A step body that records when it ran (ms) under `name`, taking `ms`. */
const timedWork = async (name, event, ms) => {
  bump(name, "work", event);
  const start = Date.now();
  await sleepMs(ms);
  const end = Date.now();
  record(name, { key: keyOf(event), user: event.data?.user ?? null, start, end });
  return end - start;
};

const limited = inngest.createFunction(
  { id: "limited", triggers: [{ event: "flow/limited" }], concurrency: { limit: 1 } },
  async ({ event, step }) => step.run("work", () => timedWork("limited", event, event.data?.ms ?? 300)),
);

const keyedLimit = inngest.createFunction(
  {
    id: "keyed-limit",
    triggers: [{ event: "flow/keyed" }],
    concurrency: { limit: 1, key: "event.data.user" },
  },
  async ({ event, step }) => step.run("work", () => timedWork("keyed-limit", event, 400)),
);

const throttled = inngest.createFunction(
  { id: "throttled", triggers: [{ event: "flow/throttled" }], throttle: { limit: 1, period: "1s" } },
  async ({ event, step }) =>
    step.run("start", () => {
      bump("throttled", "start", event);
      record("throttled", { key: keyOf(event), at: Date.now() });
      return "started";
    }),
);

const rateLimited = inngest.createFunction(
  {
    id: "rate-limited",
    triggers: [{ event: "flow/rate-limited" }],
    rateLimit: { limit: 1, period: "1m", key: "event.data.key" },
  },
  async ({ event, step }) => step.run("work", () => (bump("rate-limited", "work", event), "ran")),
);

const idempotent = inngest.createFunction(
  { id: "idempotent", triggers: [{ event: "flow/idempotent" }], idempotency: "event.data.order" },
  async ({ event, step }) => step.run("work", () => (bump("idempotent", "work", event), "ran")),
);

const debounced = inngest.createFunction(
  {
    id: "debounced",
    triggers: [{ event: "flow/debounce" }],
    debounce: { period: "2s", key: "event.data.key" },
  },
  async ({ event, step }) =>
    step.run("seen", () => {
      bump("debounced", "seen", event);
      return event.data?.n ?? null;
    }),
);

const batched = inngest.createFunction(
  {
    id: "batched",
    triggers: [{ event: "flow/batch" }],
    batchEvents: { maxSize: 5, timeout: "3s" },
  },
  async ({ events, step }) =>
    step.run("sum", () => {
      record("batched", { size: events.length, ns: events.map((e) => e.data?.n) });
      return events.map((e) => e.data?.n);
    }),
);

const prioritized = inngest.createFunction(
  {
    id: "prioritized",
    triggers: [{ event: "flow/priority" }],
    concurrency: { limit: 1 },
    priority: { run: "event.data.p" },
  },
  async ({ event, step }) =>
    step.run("work", async () => {
      record("prioritized", keyOf(event));
      await sleepMs(event.data?.ms ?? 50);
      return keyOf(event);
    }),
);

const singletonSkip = inngest.createFunction(
  {
    id: "singleton-skip",
    triggers: [{ event: "flow/singleton-skip" }],
    singleton: { mode: "skip", key: "event.data.user" },
  },
  async ({ event, step }) => {
    await step.run("first", () => (bump("singleton-skip", "first", event), "first"));
    await step.sleep("hold", "2s");
    return "done";
  },
);

const singletonCancel = inngest.createFunction(
  {
    id: "singleton-cancel",
    triggers: [{ event: "flow/singleton-cancel" }],
    singleton: { mode: "cancel", key: "event.data.user" },
  },
  async ({ event, step }) => {
    await step.run("first", () => (bump("singleton-cancel", "first", event), "first"));
    await step.sleep("hold", "2s");
    return "done";
  },
);

const bulk = inngest.createFunction(
  { id: "bulk", triggers: [{ event: "flow/bulk" }] },
  async ({ step }) => step.run("work", () => "bulk"),
);

const quick = inngest.createFunction(
  { id: "quick", triggers: [{ event: "flow/quick" }] },
  async ({ step }) => step.run("work", () => Date.now()),
);

// Load bench (benches/load.rs, part `keyed`): 10 runs at a time per `k`; no counters or logging.
const benchKeyed = inngest.createFunction(
  {
    id: "bench-keyed",
    triggers: [{ event: "bench/keyed" }],
    concurrency: { limit: 10, key: "event.data.k" },
  },
  async ({ event, step }) =>
    step.run("work", async () => {
      await sleepMs(20);
      return event.data.k;
    }),
);

const fiveSteps = inngest.createFunction(
  { id: "five-steps", triggers: [{ event: "test/five-steps" }] },
  async ({ event, step }) => {
    let total = 0;
    for (let i = 1; i <= 5; i++) {
      total += await step.run(`f${i}`, () => {
        bump("five-steps", `f${i}`, event);
        return i;
      });
    }
    return { total };
  },
);

// Checkpointing: steps before and after one that fails (`event.data.fail`:
// "retry" fails twice then succeeds, "fatal" throws NonRetriableError).
const ckptMixed = inngest.createFunction(
  { id: "ckpt-mixed", retries: 3, triggers: [{ event: "test/ckpt-mixed" }] },
  async ({ event, step }) => {
    const one = await step.run("one", () => {
      bump("ckpt-mixed", "one", event);
      return 1;
    });
    const mid = await step.run("mid", () => {
      bump("ckpt-mixed", "mid", event);
      const key = `ckpt-mixed:${keyOf(event)}`;
      const n = (flakyExecutions.get(key) ?? 0) + 1;
      flakyExecutions.set(key, n);
      if (event.data?.fail === "fatal") throw new NonRetriableError("fatal mid");
      if (n <= 2) throw new Error("mid failure");
      return n;
    });
    const two = await step.run("two", () => {
      bump("ckpt-mixed", "two", event);
      return 2;
    });
    return { one, mid, two };
  },
);

const startTimeout = inngest.createFunction(
  {
    id: "start-timeout",
    triggers: [{ event: "test/start-timeout" }],
    concurrency: { limit: 1 },
    timeouts: { start: "1s" },
  },
  async ({ event, step }) =>
    step.run("work", async () => {
      bump("start-timeout", "work", event);
      await sleepMs(2500);
      return "worked";
    }),
);

// Metadata: scores written inside a step (they travel with its result), from the
// function body and by a durable `step.score` aimed at the earlier step (both through
// POST /v1/runs/{id}/metadata).
const scores = inngest.createFunction(
  {
    id: "scores",
    retries: 0,
    triggers: [{ event: "test/scores" }],
    middleware: [scoreMiddleware()],
  },
  async ({ event, step, runId }) => {
    await step.run("scored", async () => {
      bump("scores", "scored", event);
      await inngest.score({ name: "in_step", value: 1 });
      await inngest.score({ runId, name: "from_step_for_run", value: true });
      return "scored";
    });
    await inngest.score({ name: "from_body", value: 0.5 });
    await step.score("score-later", { name: "durable", value: 2, stepId: "scored" });
    return "done";
  },
);

// Sessions: each run records its `ctx.sessions` under "sessions"; the parent passes
// its own on by `step.sendEvent` (one event inheriting, one overriding `org` and
// cutting `team`) and by `step.invoke`.
const recordSessions = (fn, event, sessions) =>
  record("sessions", { fn, via: event.data?.via ?? null, key: keyOf(event), sessions: sessions ?? null });

const sessionChild = inngest.createFunction(
  { id: "session-child", triggers: [{ event: "test/session-child" }] },
  async ({ event, sessions }) => {
    recordSessions("session-child", event, sessions);
    return sessions ?? null;
  },
);

const sessionInvokee = inngest.createFunction(
  { id: "session-invokee", triggers: [{ event: "test/session-invokee-never-sent" }] },
  async ({ event, sessions }) => {
    recordSessions("session-invokee", event, sessions);
    return sessions ?? null;
  },
);

const sessionParent = inngest.createFunction(
  { id: "session-parent", triggers: [{ event: "test/session-parent" }] },
  async ({ event, step, sessions }) => {
    recordSessions("session-parent", event, sessions);
    const key = keyOf(event);
    await step.sendEvent("send", [
      { name: "test/session-child", data: { key, via: "sendEvent" } },
      {
        name: "test/session-child",
        data: { key, via: "override" },
        meta: { sessions: { org: "override", team: null } },
      },
    ]);
    await step.invoke("invoke", { function: sessionInvokee, data: { key, via: "invoke" } });
    return "sent";
  },
);

// Signals: a run waits for a named signal; another sends it with step.sendSignal.
const signalWaiter = inngest.createFunction(
  { id: "signal-waiter", triggers: [{ event: "test/signal.wait" }] },
  async ({ event, step }) => {
    const got = await step.waitForSignal("wait", {
      signal: event.data.signal,
      timeout: event.data.timeout ?? "30s",
      onConflict: event.data.onConflict ?? "fail",
    });
    await step.run("after", () => {
      bump("signal-waiter", "after", event);
      return "after";
    });
    return { got };
  },
);

const signalSender = inngest.createFunction(
  { id: "signal-sender", triggers: [{ event: "test/signal.send" }] },
  async ({ event, step }) => {
    const sent = await step.sendSignal("send", {
      signal: event.data.signal,
      data: event.data.payload,
    });
    // And from the client, outside a step: a signal nobody waits for.
    const nobody = await step.run("nobody", () =>
      inngest.sendSignal({ signal: `${event.data.signal}-nobody`, data: 1 }),
    );
    return { sent, nobody };
  },
);

const functions = [
  scores,
  sessionChild,
  sessionInvokee,
  sessionParent,
  signalWaiter,
  signalSender,
  ckptMixed,
  startTimeout,
  fiveSteps,
  limited,
  keyedLimit,
  throttled,
  rateLimited,
  idempotent,
  debounced,
  batched,
  prioritized,
  singletonSkip,
  singletonCancel,
  bulk,
  quick,
  threeSteps,
  flaky,
  nonRetriable,
  alwaysFails,
  tenSteps,
  slowSteps,
  sleeper,
  waitMatch,
  waitIf,
  invokee,
  invoker,
  parallel,
  cancellable,
  failsHandled,
  ticker,
  expression,
  sender,
  deferred,
  deferrer,
  fetcher,
  ai,
  finishTimeout,
  bigState,
  tooBig,
  sleepy,
  benchSleep,
  benchWait,
  benchKeyed,
];

// EXTRA_FUNCTION=<id>: one more function (discovery tests change an app's functions).
if (process.env.EXTRA_FUNCTION) {
  functions.push(
    inngest.createFunction(
      { id: process.env.EXTRA_FUNCTION, triggers: [{ event: "test/extra" }] },
      async () => "extra",
    ),
  );
}

// ---- HTTP server ----------------------------------------------------------------------

const inngestHandler = serve({ client: inngest, functions });

const sendJson = (res, status, body) => {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "content-type": "application/json",
    "content-length": Buffer.byteLength(text),
  });
  res.end(text);
};

const server = http.createServer((req, res) => {
  const path = (req.url || "/").split("?")[0];

  if (path === "/api/inngest" || path === "/api/inngest/") {
    if (req.method === "POST" && process.env.DROP_REUSED_CONNECTIONS === "1") {
      const socket = req.socket;
      socket.batonCalls = (socket.batonCalls ?? 0) + 1;
      if (socket.batonCalls > 1) {
        record("dropped", req.headers["x-inngest-step-id"] ?? null);
        socket.destroy();
        return;
      }
    }
    if (req.method === "POST" && process.env.RECORD_CALLS === "1") {
      const query = new URL(req.url || "/", "http://localhost").searchParams;
      record("calls", {
        fnId: query.get("fnId"),
        stepId: query.get("stepId"),
        runId: req.headers["x-run-id"] ?? null,
        jobId: req.headers["x-inngest-job-id"] ?? null,
      });
    }
    return inngestHandler(req, res);
  }
  if (path === "/counters" && req.method === "GET") {
    return sendJson(res, 200, Object.fromEntries(counters));
  }
  if (path === "/counters/reset" && req.method === "POST") {
    req.resume(); // drain any body
    counters.clear();
    flakyExecutions.clear();
    records.clear();
    return sendJson(res, 200, { ok: true });
  }
  if (path === "/records" && req.method === "GET") {
    return sendJson(res, 200, Object.fromEntries(records));
  }
  if (path === "/echo" && req.method === "GET") {
    const query = Object.fromEntries(new URL(req.url || "/", "http://localhost").searchParams);
    return sendJson(res, 200, { echo: true, query });
  }
  if (path === "/fake-ai/v1/chat/completions" && req.method === "POST") {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => {
      const text = Buffer.concat(chunks).toString("utf8");
      let body;
      try {
        body = JSON.parse(text);
      } catch {
        body = text;
      }
      record("ai", { authorization: req.headers.authorization ?? null, body });
      sendJson(res, 200, {
        id: "x",
        object: "chat.completion",
        choices: [
          {
            index: 0,
            message: { role: "assistant", content: "hello from fake ai" },
            finish_reason: "stop",
          },
        ],
      });
    });
    return;
  }
  return sendJson(res, 404, { error: "not found" });
});

server.listen(Number(PORT), "127.0.0.1", () => {
  console.log(`app listening on ${PORT}`);
  console.log(`ai: step.ai.infer AIGateway url = ${openai(aiModelOptions).url}`);
});
