// Durable endpoints for Baton's end-to-end tests: plain HTTP handlers wrapped by the
// official `inngest` JS SDK v4's endpoint adapter, so that their steps are durable.
//
// Usage: PORT=<port> INNGEST_DEV=1 INNGEST_BASE_URL=http://127.0.0.1:<baton> node endpoint.js
//
// Routes (all on 127.0.0.1:PORT):
//   GET  /records          JSON {"<path>:<step>:<key>": <times the step ran>}
//   GET  /sync?key=K       steps a and b in the request itself; answers 201 with
//                          {"a", "b", "key"} and an x-endpoint header
//   GET  /async?key=K&sleep=D
//                          step a, step.sleep D (default 1s), step b: the handler answers
//                          302 to Baton, and the run finishes through Baton's queue;
//                          the result is {"a", "b", "key"}
//   POST /flaky?key=K&n=N  step "double" fails its first attempt (in the request), then
//                          returns 2N; the result is {"doubled", "attempts"}. (The adapter
//                          reads the request body itself, so the handler does not.)
//   GET  /fails?key=K      step "boom" throws a NonRetriableError: the run fails
// Every other path answers 404 without starting a run.

import http from "node:http";
import { Inngest, NonRetriableError, step } from "inngest";
import { endpointAdapter, serveEndpoint } from "inngest/node";

const PORT = process.env.PORT;
if (!PORT || !/^\d+$/.test(PORT)) {
  console.error("PORT env var is required (a number)");
  process.exit(2);
}

const inngest = new Inngest({ id: "baton-endpoints", endpointAdapter });

const counts = new Map();
function ran(path, name, key) {
  const id = `${path}:${name}:${key}`;
  const n = (counts.get(id) || 0) + 1;
  counts.set(id, n);
  return n;
}

const routes = {
  "/sync": async (url, key) => {
    const a = await step.run("a", () => (ran(url.pathname, "a", key), "A"));
    const b = await step.run("b", () => (ran(url.pathname, "b", key), "B"));
    return Response.json({ a, b, key }, { status: 201, headers: { "x-endpoint": "sync" } });
  },
  "/async": async (url, key) => {
    const a = await step.run("a", () => (ran(url.pathname, "a", key), "A"));
    await step.sleep("nap", url.searchParams.get("sleep") || "1s");
    const b = await step.run("b", () => (ran(url.pathname, "b", key), "B"));
    return { a, b, key };
  },
  "/flaky": async (url, key) => {
    const n = Number(url.searchParams.get("n"));
    const doubled = await step.run("double", () => {
      if (ran(url.pathname, "double", key) === 1) {
        throw new Error("the first attempt fails");
      }
      return n * 2;
    });
    return { doubled, attempts: counts.get(`${url.pathname}:double:${key}`) };
  },
  "/fails": async (url, key) => {
    await step.run("boom", () => {
      ran(url.pathname, "boom", key);
      throw new NonRetriableError("no way");
    });
    return "unreachable";
  },
};

const handler = inngest.endpoint(async (req) => {
  const url = new URL(req.url);
  const route = routes[url.pathname];
  return route(url, url.searchParams.get("key") || "nokey");
});
const listener = serveEndpoint(handler);

const server = http.createServer((req, res) => {
  const path = (req.url || "/").split("?")[0];
  if (path === "/records") {
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(Object.fromEntries(counts)));
    return;
  }
  if (!routes[path]) {
    res.writeHead(404, { "content-type": "application/json" });
    res.end(JSON.stringify({ error: `no route ${path}` }));
    return;
  }
  listener(req, res);
});

server.listen(Number(PORT), "127.0.0.1", () => {
  console.log(`app listening on http://127.0.0.1:${PORT}`);
});
