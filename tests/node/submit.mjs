// Submit one task to d8-mesh from Node.js and wait for its result: no d8 library, only `nats`.
// Usage: NATS_URL=nats://127.0.0.1:4222 node submit.mjs <task-id> "<prompt>"
import { connect, createInbox, headers } from "nats";

const [taskId, prompt] = process.argv.slice(2);
const nc = await connect({ servers: process.env.NATS_URL, timeout: 5000 });
const js = nc.jetstream();

// Subscribe to the reply subject first, so the result cannot arrive before we listen.
const inbox = createInbox();
const replies = nc.subscribe(inbox, { max: 1, timeout: 20000 });

const task = { id: taskId, prompt, reply_to: inbox, metadata: { client: "node" } };
const h = headers();
h.set("Nats-Msg-Id", taskId); // a repeated submit within the duplicate window is dropped
const ack = await js.publish("tasks.chat.any", JSON.stringify(task), { headers: h });

let pushed = null;
for await (const m of replies) {
  pushed = JSON.parse(new TextDecoder().decode(m.data));
}

// The same result, read later from the `results` bucket (what `nats kv get results <id>` shows).
const kv = await js.views.kv("results");
const entry = await kv.get(taskId);
const stored = entry ? JSON.parse(new TextDecoder().decode(entry.value)) : null;

console.log(JSON.stringify({ ack: { stream: ack.stream, seq: ack.seq, duplicate: ack.duplicate }, pushed, stored }));
await nc.close();
