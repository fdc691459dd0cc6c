// Baton end-to-end / load-benchmark test app using the official `inngest` JS SDK v4.
//
// Usage: PORT=<port> [APP_ID=baton-test] INNGEST_DEV=1 INNGEST_BASE_URL=http://127.0.0.1:<baton> node app.js
//
// Routes (all on 127.0.0.1:PORT):
//   *    /api/inngest     the Inngest SDK handler (GET introspection, PUT sync, POST call)
//   GET  /counters        JSON {"<functionId>:<stepName>:<event.data.key|nokey>": <count>}
//   POST /counters/reset  clears the counters (and the per-key execution counts of `flaky`)
//
// The SDK is configured only via environment variables (INNGEST_DEV, INNGEST_BASE_URL,
// INNGEST_SIGNING_KEY, INNGEST_EVENT_KEY, ...). Optional: INNGEST_CHECKPOINTING=0 turns off
// the SDK's default-on checkpointing (`checkpointing: false`); unset keeps the SDK default.

import http from "node:http";
import { Inngest, NonRetriableError } from "inngest";
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

const functions = [threeSteps, flaky, nonRetriable, alwaysFails, tenSteps, slowSteps, sleeper];

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
    return inngestHandler(req, res);
  }
  if (path === "/counters" && req.method === "GET") {
    return sendJson(res, 200, Object.fromEntries(counters));
  }
  if (path === "/counters/reset" && req.method === "POST") {
    req.resume(); // drain any body
    counters.clear();
    flakyExecutions.clear();
    return sendJson(res, 200, { ok: true });
  }
  return sendJson(res, 404, { error: "not found" });
});

server.listen(Number(PORT), "127.0.0.1", () => {
  console.log(`app listening on ${PORT}`);
});
