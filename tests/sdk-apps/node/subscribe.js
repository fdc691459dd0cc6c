// A realtime subscriber with the official SDK (`subscribe` from `inngest/realtime`, which
// opens Baton's /v1/realtime/connect WebSocket), for Baton's end-to-end tests.
//
// Usage: INNGEST_BASE_URL=http://127.0.0.1:<baton> [INNGEST_DEV=1 | INNGEST_SIGNING_KEY=...] \
//        node --experimental-websocket subscribe.js <channel> <topic>[,<topic>...]
// Env:   SUBSCRIBE_TOKEN=<jwt> subscribes with that token instead of asking
//        getSubscriptionToken for one.
//
// Prints one JSON line per event: {"ready": true} once subscribed, then each message
// as {"kind", "channel", "topic", "data", "runId"} (chunks and stream markers too),
// {"closed": true} when the server ends the subscription, or {"error": "..."} when
// subscribing fails (then exits 1).

import { Inngest } from "inngest";
import { getSubscriptionToken, subscribe } from "inngest/realtime";

const [channel, topicList] = process.argv.slice(2);
if (!channel || !topicList) {
  console.error("usage: subscribe.js <channel> <topic>[,<topic>...]");
  process.exit(2);
}
const topics = topicList.split(",");
const print = (value) => console.log(JSON.stringify(value));

const inngest = new Inngest({ id: "baton-subscriber" });

try {
  const token = process.env.SUBSCRIBE_TOKEN
    ? { channel, topics, key: process.env.SUBSCRIBE_TOKEN, apiBaseUrl: inngest.apiBaseUrl }
    : await getSubscriptionToken(inngest, { channel, topics });
  const stream = await subscribe(token);
  print({ ready: true });
  for await (const message of stream) {
    print({
      kind: message.kind,
      channel: message.channel,
      topic: message.topic,
      data: message.data,
      runId: message.runId ?? null,
    });
  }
  print({ closed: true });
  process.exit(0);
} catch (err) {
  print({ error: String(err?.message ?? err?.type ?? err) });
  process.exit(1);
}
