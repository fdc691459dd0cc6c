// Drives the Baton dashboard in Debian's headless chromium (playwright-core).
// Started by tests/it/browser.rs with a running baton and runs to look at:
//   BATON_URL, ARTIFACTS (screenshot dir), SCENARIO (dev | login), and for
//   dev: COMPLETED_RUN, SLEEPING_RUN, FAILED_RUN; for login: PASSWORD; for
//   metadata: METADATA_RUN (a run of baton-test-scores).
// Exits non-zero with a message when something is not as expected.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`missing env ${name}`);
  return value;
};
const base = env("BATON_URL");
const artifacts = env("ARTIFACTS");
mkdirSync(artifacts, { recursive: true });
const TIMEOUT = 20_000;

const check = (condition, message) => {
  if (!condition) throw new Error(message);
};

async function devScenario(page) {
  const completed = env("COMPLETED_RUN");
  const sleeping = env("SLEEPING_RUN");
  const failed = env("FAILED_RUN");

  // The runs list shows the run.
  await page.goto(`${base}/#/runs`);
  await page.locator(`[data-testid="run-row"][data-run-id="${completed}"]`).first().waitFor({ timeout: TIMEOUT });
  await page.screenshot({ path: join(artifacts, "runs.png"), fullPage: true });

  // A run's page shows each step in its timeline.
  await page.goto(`${base}/#/runs/${completed}`);
  const timeline = page.locator('[data-testid="timeline"]');
  await timeline.waitFor({ timeout: TIMEOUT });
  await page.locator('[data-testid="timeline-step"][data-step-name="c"]').first().waitFor({ timeout: TIMEOUT });
  const names = await page.locator('[data-testid="timeline-step"]').evaluateAll((els) =>
    els.map((el) => el.getAttribute("data-step-name")),
  );
  for (const step of ["a", "b", "c"]) {
    check(names.includes(step), `step ${step} missing from the timeline: ${JSON.stringify(names)}`);
  }
  const status = await page.locator('[data-testid="run-status"]').first().textContent();
  check(/completed/i.test(status ?? ""), `status shows ${status}`);
  await page.screenshot({ path: join(artifacts, "run-timeline.png"), fullPage: true });

  // Cancel a sleeping run.
  await page.goto(`${base}/#/runs/${sleeping}`);
  await page.locator('[data-testid="cancel-run"]').first().click({ timeout: TIMEOUT });
  await page.locator('[data-testid="run-status"]', { hasText: /cancelled/i }).first().waitFor({ timeout: TIMEOUT });
  await page.screenshot({ path: join(artifacts, "cancelled.png"), fullPage: true });
  const cancelled = await (await fetch(`${base}/v1/runs/${sleeping}`)).json();
  check(cancelled.data.status === "Cancelled", `the API says ${cancelled.data.status}`);

  // Replay a failed run: a new run opens.
  await page.goto(`${base}/#/runs/${failed}`);
  await page.locator('[data-testid="replay-run"]').first().click({ timeout: TIMEOUT });
  await page.waitForFunction(
    (old) => /#\/runs\/[0-9A-Z]{26}$/.test(location.hash) && !location.hash.endsWith(old),
    failed,
    { timeout: TIMEOUT },
  );
  const replayed = (await page.evaluate(() => location.hash)).split("/").pop();
  const replay = await (await fetch(`${base}/v1/runs/${replayed}`)).json();
  check(replay.data && replay.data.function_id, `the replayed run ${replayed} is not in the API`);
  await page.locator('[data-testid="timeline"]').first().waitFor({ timeout: TIMEOUT });
  await page.screenshot({ path: join(artifacts, "replayed.png"), fullPage: true });

  // Events, and a phone-width view.
  await page.goto(`${base}/#/events`);
  await page.locator('[data-testid="event-row"]').first().waitFor({ timeout: TIMEOUT });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${base}/#/runs/${completed}`);
  await page.locator('[data-testid="timeline-step"]').first().waitFor({ timeout: TIMEOUT });
  await page.screenshot({ path: join(artifacts, "run-timeline-phone.png"), fullPage: true });
  console.log(JSON.stringify({ ok: true, replayed }));
}

// SCENARIO=ux: APP_URL (found by discovery, never synced by hand),
// FLAKY_RUN (retried twice), WAITING_RUN (waits for test/wait.reply),
// KEEP_RUN and DOOMED_RUN (sleeping runs of baton-test-cancellable with
// keys "keep" and "doomed").
async function uxScenario(page) {
  const appUrl = env("APP_URL");
  const flaky = env("FLAKY_RUN");
  const waiting = env("WAITING_RUN");
  const keep = env("KEEP_RUN");
  const doomed = env("DOOMED_RUN");

  // Apps: discovery found and synced the app.
  await page.goto(`${base}/#/apps`);
  await page.locator(`[data-testid="discovered-app"][data-url="${appUrl}"][data-state="synced"]`).waitFor({ timeout: TIMEOUT });
  await page.screenshot({ path: join(artifacts, "apps-discovery.png"), fullPage: true });

  // The trace of a retried step: one segment per attempt, failed ones with their error.
  await page.goto(`${base}/#/runs/${flaky}`);
  await page.locator('[data-testid="trace-row"][data-span-name="flaky-step"]').waitFor({ timeout: TIMEOUT });
  const attempts = await page
    .locator('[data-testid="trace-row"][data-span-name="flaky-step"] [data-testid="trace-attempt"]')
    .evaluateAll((els) => els.map((el) => el.getAttribute("data-error")));
  check(attempts.length === 3, `three attempts expected: ${JSON.stringify(attempts)}`);
  check(/flaky failure/.test(attempts[0]) && /flaky failure/.test(attempts[1]) && attempts[2] === "",
    `attempt errors: ${JSON.stringify(attempts)}`);
  // The attempts lie left to right on a real axis (positions are set
  // through the CSSOM: the CSP refuses inline style attributes).
  const boxes = await page
    .locator('[data-testid="trace-row"][data-span-name="flaky-step"] [data-testid="trace-attempt"]')
    .evaluateAll((els) => els.map((el) => el.getBoundingClientRect().x));
  check(boxes[0] < boxes[1] && boxes[1] < boxes[2], `attempts are not laid out in time: ${JSON.stringify(boxes)}`);
  check(boxes[2] - boxes[0] > 100, `the axis is squashed: ${JSON.stringify(boxes)}`);
  const kinds = await page.locator('[data-testid="trace-row"]').evaluateAll((els) => els.map((el) => el.getAttribute("data-kind")));
  check(kinds[0] === "queued", `the trace starts with the queue: ${JSON.stringify(kinds)}`);
  await page.screenshot({ path: join(artifacts, "trace-retries.png"), fullPage: true });

  // A wait shows what it waits for.
  await page.goto(`${base}/#/runs/${waiting}`);
  const wait = page.locator('[data-testid="trace-row"][data-kind="wait"][data-status="waiting"] [data-testid="trace-wait"]');
  await wait.waitFor({ timeout: TIMEOUT });
  const waitText = await wait.textContent();
  check(/test\/wait\.reply/.test(waitText ?? ""), `the wait says ${waitText}`);
  await page.screenshot({ path: join(artifacts, "trace-wait.png"), fullPage: true });

  // Bulk cancel: filter the list, narrow with CEL, preview, confirm, follow.
  page.on("dialog", (dialog) => dialog.accept());
  await page.goto(`${base}/#/runs?function=baton-test-cancellable&status=Running`);
  await page.locator('[data-testid="bulk-panel"] summary').click({ timeout: TIMEOUT });
  await page.fill('[data-testid="bulk-expression"]', 'event.data.key == "doomed"');
  await page.click('[data-testid="bulk-preview"]');
  const count = page.locator('[data-testid="bulk-count"]');
  await count.waitFor({ timeout: TIMEOUT });
  check((await count.getAttribute("data-count")) === "1", `preview: ${await count.textContent()}`);
  await page.click('[data-testid="bulk-cancel"]');
  await page.locator('[data-testid="bulk-done"]').waitFor({ timeout: TIMEOUT });
  await page.screenshot({ path: join(artifacts, "bulk-cancel.png"), fullPage: true });
  const status = async (id) => (await (await fetch(`${base}/v1/runs/${id}`)).json()).data.status;
  check((await status(doomed)) === "Cancelled", `the doomed run is ${await status(doomed)}`);
  check((await status(keep)) === "Running", `the kept run is ${await status(keep)}`);
  console.log(JSON.stringify({ ok: true }));
}

// SCENARIO=metadata: the run's scores in its Metadata card, the step's
// scores and AI usage under the step in the timeline.
async function metadataScenario(page) {
  const run = env("METADATA_RUN");
  await page.goto(`${base}/#/runs/${run}`);
  const card = page.locator('[data-testid="run-metadata"]');
  await card.locator('[data-testid="metadata-entry"][data-kind="inngest.score"]').waitFor({ timeout: TIMEOUT });
  const runScores = await card.locator(".chip").allTextContents();
  check(runScores.some((t) => t.includes("from_body") && t.includes("0.5")), `run scores: ${JSON.stringify(runScores)}`);
  check(runScores.some((t) => t.includes("from_step_for_run") && t.includes("true")), `run scores: ${JSON.stringify(runScores)}`);
  const step = page.locator('[data-testid="timeline-step"][data-step-name="scored"]');
  await step.locator('[data-testid="metadata-entry"][data-kind="inngest.ai"]').waitFor({ timeout: TIMEOUT });
  const stepScores = await step.locator('[data-testid="metadata-entry"][data-kind="inngest.score"] .chip').allTextContents();
  check(stepScores.some((t) => t.includes("in_step")) && stepScores.some((t) => t.includes("durable")),
    `step scores: ${JSON.stringify(stepScores)}`);
  const usage = await step.locator('[data-testid="metadata-entry"][data-kind="inngest.ai"]').textContent();
  check(/estimated_cost/.test(usage ?? ""), `the AI usage shows ${usage}`);
  const other = await page.locator('[data-testid="timeline-step"][data-step-name="score-later"] [data-testid="metadata-entry"]').count();
  check(other === 0, `the score-later step shows ${other} metadata entries`);
  await page.screenshot({ path: join(artifacts, "run-metadata.png"), fullPage: true });
  console.log(JSON.stringify({ ok: true }));
}

async function loginScenario(page) {
  const password = env("PASSWORD");
  await page.goto(`${base}/`);
  await page.locator('[data-testid="login-password"]').waitFor({ timeout: TIMEOUT });
  check(page.url().endsWith("/login"), `without a login the dashboard is at ${page.url()}`);
  const text = await page.textContent("body");
  check(!/run_id|Completed/.test(text ?? ""), "the login page shows run data");
  await page.screenshot({ path: join(artifacts, "login.png") });

  await page.fill('[data-testid="login-password"]', "not the password");
  await page.click('[data-testid="login-submit"]');
  await page.locator('[data-testid="login-error"]').waitFor({ timeout: TIMEOUT });

  await page.fill('[data-testid="login-password"]', password);
  await page.click('[data-testid="login-submit"]');
  await page.locator('[data-testid="nav-runs"]').waitFor({ timeout: TIMEOUT });
  // An action without the CSRF token is refused, even with the cookie.
  const status = await page.evaluate(async () => {
    const response = await fetch("/v1/events", { method: "POST", body: JSON.stringify({ name: "x/y" }) });
    return response.status;
  });
  check(status === 403, `a POST without the CSRF token answered ${status}`);
  await page.screenshot({ path: join(artifacts, "after-login.png") });
  console.log(JSON.stringify({ ok: true }));
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (err) => console.error(`page error: ${err.message}`));
  if (env("SCENARIO") === "login") await loginScenario(page);
  else if (env("SCENARIO") === "ux") await uxScenario(page);
  else if (env("SCENARIO") === "metadata") await metadataScenario(page);
  else await devScenario(page);
} catch (err) {
  console.error(`dashboard test failed: ${err.stack ?? err}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
