// Drives the unmodified @fal-ai/client 1.10.1 against a live ovi-server through proxy mode (spec §10).
// usage: node flows.mjs <flow> <base_url> <key> [arg]   → prints one JSON object; tests/clients asserts on it.
import { readFileSync } from "node:fs";
import { createFalClient, ApiError, ValidationError } from "@fal-ai/client";

const [flow, base, key, arg] = process.argv.slice(2);
const fal = createFalClient({ credentials: key, proxyUrl: { url: `${base}/api/fal/proxy`, when: "always" } });
const T2V = "fal-ai/ovi";
const I2V = "fal-ai/ovi/image-to-video";
const small = { num_inference_steps: 2, resolution: "992x512" };

function describeError(err) {
  if (err instanceof ValidationError) {
    return { kind: "ValidationError", status: err.status, fieldErrors: err.fieldErrors, stepsErrors: err.getFieldErrors("num_inference_steps") };
  }
  if (err instanceof ApiError) {
    return { kind: "ApiError", status: err.status, body: err.body, requestId: err.requestId };
  }
  return { kind: err?.constructor?.name ?? "unknown", message: String(err) };
}

async function capture(promise) {
  try {
    return { ok: true, value: await promise };
  } catch (err) {
    return { ok: false, error: describeError(err) };
  }
}

const flows = {
  // subscribe (polling) with logs and queue updates
  async subscribe() {
    const updates = [];
    let enqueued = null;
    const result = await fal.subscribe(T2V, {
      input: { prompt: "A cat says <S>hello<E>. <AUDCAP>A cat meows.<ENDAUDCAP>", seed: 42, ...small },
      logs: true,
      pollInterval: 200,
      onEnqueue: (id) => (enqueued = id),
      onQueueUpdate: (u) => updates.push(u),
    });
    return { data: result.data, requestId: result.requestId, enqueued, updates };
  },

  // subscribe in streaming mode: status over SSE through the proxy
  async stream() {
    const updates = [];
    const result = await fal.subscribe(T2V, {
      input: { prompt: "waves on a beach", ...small },
      logs: true,
      mode: "streaming",
      onQueueUpdate: (u) => updates.push(u),
    });
    return { data: result.data, requestId: result.requestId, updates };
  },

  // queue.submit + queue.status + queue.result (+ a webhook when arg is a URL)
  async queue() {
    const submitted = await fal.queue.submit(T2V, { input: { prompt: "a dog runs", seed: 7, ...small }, webhookUrl: arg || undefined });
    const id = submitted.request_id;
    const statuses = [];
    for (;;) {
      const status = await fal.queue.status(T2V, { requestId: id, logs: true });
      statuses.push(status);
      if (status.status === "COMPLETED") break;
      await new Promise((r) => setTimeout(r, 200));
    }
    const result = await fal.queue.result(T2V, { requestId: id });
    return { submitted, statuses, data: result.data, requestId: result.requestId };
  },

  // cancel a request that waits IN_QUEUE behind another
  async cancel() {
    const first = await fal.queue.submit(T2V, { input: { prompt: "first, runs", ...small, num_inference_steps: 30 } });
    const second = await fal.queue.submit(T2V, { input: { prompt: "second, cancelled", ...small } });
    const before = await fal.queue.status(T2V, { requestId: second.request_id });
    await fal.queue.cancel(T2V, { requestId: second.request_id });
    const after = await fal.queue.status(T2V, { requestId: second.request_id, logs: true });
    const cancelledResult = await capture(fal.queue.result(T2V, { requestId: second.request_id }));
    let firstStatus;
    for (;;) {
      firstStatus = await fal.queue.status(T2V, { requestId: first.request_id });
      if (firstStatus.status === "COMPLETED") break;
      await new Promise((r) => setTimeout(r, 200));
    }
    const firstData = (await fal.queue.result(T2V, { requestId: first.request_id })).data;
    const cancelAgain = await capture(fal.queue.cancel(T2V, { requestId: first.request_id }));
    return { before, after, cancelledResult, firstData, cancelAgain };
  },

  // storage upload (initiate → PUT → file_url), then image-to-video with the uploaded URL, and a Blob input
  async upload() {
    const png = readFileSync(arg);
    const url = await fal.storage.upload(new Blob([png], { type: "image/png" }));
    const downloaded = Buffer.from(await (await fetch(url)).arrayBuffer());
    const withUrl = await fal.subscribe(I2V, { input: { prompt: "the picture comes alive", image_url: url, ...small } });
    // transformInput uploads Blob values by itself
    const withBlob = await fal.subscribe(I2V, {
      input: { prompt: "again", image_url: new Blob([png], { type: "image/png" }), ...small },
    });
    return { url, sameBytes: downloaded.equals(png), withUrl: withUrl.data, withBlob: withBlob.data };
  },

  // image-to-video with a data: URI (sent verbatim by the JS client)
  async datauri() {
    const uri = `data:image/png;base64,${readFileSync(arg).toString("base64")}`;
    const result = await fal.subscribe(I2V, { input: { prompt: "from a data uri", image_url: uri, seed: 5, ...small } });
    return { data: result.data, requestId: result.requestId };
  },

  // validation errors surface as ValidationError (422) with field errors
  async validation() {
    const zeroSteps = await capture(fal.subscribe(T2V, { input: { prompt: "p", num_inference_steps: 0 } }));
    const badResolution = await capture(fal.subscribe(T2V, { input: { prompt: "p", resolution: "1x1" } }));
    const noImage = await capture(fal.subscribe(I2V, { input: { prompt: "p" } }));
    const syncZeroSteps = await capture(fal.run(T2V, { input: { prompt: "p", num_inference_steps: 0 } }));
    return { zeroSteps, badResolution, noImage, syncZeroSteps };
  },

  // fal.run: the blocking call
  async run() {
    const result = await fal.run(T2V, { input: { prompt: "sync", seed: 11, ...small } });
    return { data: result.data, requestId: result.requestId };
  },

  // a wrong key is a 401 ApiError
  async badkey() {
    const bad = createFalClient({ credentials: "nope:nope", proxyUrl: { url: `${base}/api/fal/proxy`, when: "always" } });
    return { submit: await capture(bad.queue.submit(T2V, { input: { prompt: "p" } })) };
  },
};

const out = await flows[flow]();
process.stdout.write(JSON.stringify(out) + "\n");
