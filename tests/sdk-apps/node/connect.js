// Baton end-to-end test worker using the official `inngest` JS SDK v4's `connect()`:
// no HTTP server; it dials Baton's Connect gateway over a WebSocket and takes calls there.
//
// Usage: [APP_ID=baton-connect] [WORKER_ID=w1] EXEC_LOG=<file> INNGEST_DEV=1 \
//        INNGEST_BASE_URL=http://127.0.0.1:<baton> node connect.js
// (production: INNGEST_SIGNING_KEY=... and INNGEST_BASE_URL, without INNGEST_DEV)
//
// Every step body appends one JSON line {worker, fn, step, runId, phase} to EXEC_LOG
// (synchronously, before the step returns), so tests can count executions across
// worker processes, including ones killed with SIGKILL.
//
// Functions (ids prefixed with APP_ID by the SDK):
//   connect-steps  on "connect/steps": step-a -> "hello"; step-b sleeps event.data.sleepMs
//                  (default 0; only on worker event.data.slowWorker when that is set;
//                  phase "start" then "done") -> "hello world"; returns step-b.
//   connect-fails  on "connect/fails": step "boom" throws NonRetriableError("no way").
//   connect-work   on "connect/work": one step that sleeps event.data.sleepMs (default 200)
//                  and returns the worker id.
//
// Prints "connected" once the first connection is active. SIGTERM/SIGINT close the
// connection gracefully (the SDK's default shutdown handling).

import fs from "node:fs";
import { Inngest, NonRetriableError } from "inngest";
import { connect } from "inngest/connect";

const APP_ID = process.env.APP_ID || "baton-connect";
const WORKER_ID = process.env.WORKER_ID || `w${process.pid}`;
const EXEC_LOG = process.env.EXEC_LOG;
if (!EXEC_LOG) {
  console.error("EXEC_LOG env var is required (a file path)");
  process.exit(2);
}

const inngest = new Inngest({ id: APP_ID });
const sleepMs = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const log = (fn, step, runId, phase) =>
  fs.appendFileSync(
    EXEC_LOG,
    `${JSON.stringify({ worker: WORKER_ID, fn, step, runId, phase })}\n`,
  );

const steps = inngest.createFunction(
  { id: "connect-steps", retries: 3, triggers: [{ event: "connect/steps" }] },
  async ({ event, step, runId }) => {
    const a = await step.run("step-a", () => {
      log("connect-steps", "step-a", runId, "done");
      return "hello";
    });
    const b = await step.run("step-b", async () => {
      log("connect-steps", "step-b", runId, "start");
      const slowOn = event.data?.slowWorker;
      if (!slowOn || slowOn === WORKER_ID) await sleepMs(Number(event.data?.sleepMs ?? 0));
      log("connect-steps", "step-b", runId, "done");
      return `${a} world`;
    });
    return b;
  },
);

const work = inngest.createFunction(
  { id: "connect-work", retries: 3, triggers: [{ event: "connect/work" }] },
  async ({ event, step, runId }) => {
    return step.run("work", async () => {
      log("connect-work", "work", runId, "start");
      await sleepMs(Number(event.data?.sleepMs ?? 200));
      log("connect-work", "work", runId, "done");
      return WORKER_ID;
    });
  },
);

const fails = inngest.createFunction(
  { id: "connect-fails", retries: 3, triggers: [{ event: "connect/fails" }] },
  async ({ step, runId }) => {
    await step.run("boom", () => {
      log("connect-fails", "boom", runId, "start");
      throw new NonRetriableError("no way");
    });
  },
);

const connection = await connect({
  apps: [{ client: inngest, functions: [steps, work, fails] }],
  instanceId: WORKER_ID,
  // Same-thread execution: the worker-thread strategy needs Node 22.
  isolateExecution: false,
});
console.log(`connected ${WORKER_ID} ${connection.connectionId}`);
