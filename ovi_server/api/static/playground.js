// The playground: a form built from /openapi.json, fal's queue API over fetch (the status stream is read
// with fetch, not EventSource, so that it can carry the Authorization header), live previews, history.
// Plain ES module, no build step, nothing from another origin.

const $ = (id) => document.getElementById(id);
const ENDPOINTS = {
  t2v: { app: "fal-ai/ovi", schema: "OviInput" },
  i2v: { app: "fal-ai/ovi/image-to-video", schema: "OviImageToVideoInput" },
};
const HISTORY_KEY = "ovi.playground.history";
const KEY_KEY = "ovi.playground.key";
const HISTORY_SIZE = 20;

const state = { schemas: null, config: null, values: {}, run: null };

// -- start-up -------------------------------------------------------------------------------------------

async function main() {
  const [config, openapi] = await Promise.all([getJSON("/playground/config.json"), getJSON("/openapi.json")]);
  state.config = config;
  state.schemas = openapi.components.schemas;
  if (config.auth) {
    $("key-box").hidden = false;
    $("key").value = localStorage.getItem(KEY_KEY) || "";
    $("key").addEventListener("input", () => localStorage.setItem(KEY_KEY, $("key").value.trim()));
  }
  $("variant-note").textContent = config.note;
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", renderFields);
  $("form").addEventListener("submit", onSubmit);
  $("cancel").addEventListener("click", onCancel);
  $("clear-history").addEventListener("click", () => { localStorage.removeItem(HISTORY_KEY); renderHistory(); });
  for (const tab of document.querySelectorAll(".tabs button")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  $("copy").addEventListener("click", copySnippet);
  renderFields();
  renderHistory();
  document.body.dataset.ready = "1";
}

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function authHeaders() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Key ${key}` } : {};
}

// -- the form, from the endpoint's input schema ----------------------------------------------------------

function renderFields() {
  saveValues();
  const schema = state.schemas[ENDPOINTS[mode()].schema];
  const required = new Set(schema.required || []);
  const box = $("fields");
  box.replaceChildren();
  for (const [name, prop] of Object.entries(schema.properties)) {
    box.append(fieldFor(name, prop, required.has(name)));
  }
}

function saveValues() {
  for (const el of $("fields").querySelectorAll("[data-field]")) state.values[el.name] = el.value;
}

function fieldFor(name, prop, required) {
  const wrap = el("div", { class: "field", id: `field-${name}` });
  const id = `f-${name}`;
  wrap.append(el("label", { for: id }, `${name}${required ? " *" : ""}`));
  if (prop.description) wrap.append(el("p", { class: "help" }, prop.description));
  const kind = (prop.anyOf || [prop]).map((p) => p.type).find((t) => t && t !== "null");
  let input;
  if (prop.enum) {
    input = el("select", { id, name });
    for (const value of prop.enum) input.append(el("option", { value }, value));
  } else if (kind === "integer" || kind === "number") {
    input = el("input", { id, name, type: "number", step: kind === "integer" ? "1" : "any" });
    if (prop.minimum !== undefined) input.min = prop.minimum;
    if (prop.maximum !== undefined) input.max = prop.maximum;
    if (prop.default === undefined || prop.default === null) input.placeholder = "random";
  } else if (name === "prompt") {
    input = el("textarea", { id, name, rows: "4" });
  } else {
    input = el("input", { id, name, type: "text" });
  }
  input.dataset.field = kind || "string";
  const saved = state.values[name];
  input.value = saved !== undefined ? saved : prop.default ?? "";
  wrap.append(input);
  if (name === "prompt") wrap.append(promptInserts(input));
  if (name === "image_url") wrap.append(uploader(input));
  wrap.append(el("p", { class: "error", id: `error-${name}`, role: "alert" }));
  return wrap;
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function promptInserts(textarea) {
  const row = el("div", { class: "inserts" });
  const speech = el("button", { type: "button", id: "insert-speech", title: "speech: the words between <S> and <E>" }, "<S>…<E> speech");
  const audio = el("button", { type: "button", id: "insert-audio", title: "the sound, after 'Audio:'" }, "Audio: caption");
  speech.addEventListener("click", () => insertAround(textarea, "<S>", "<E>"));
  audio.addEventListener("click", () => insertAround(textarea, " Audio: ", "", true));
  row.append(speech, audio);
  return row;
}

function insertAround(textarea, before, after, atEnd = false) {
  if (atEnd) {
    textarea.value = textarea.value.trimEnd() + before.trimEnd() + " ";
    textarea.selectionStart = textarea.selectionEnd = textarea.value.length;
  } else {
    const { selectionStart: start, selectionEnd: end, value } = textarea;
    textarea.value = value.slice(0, start) + before + value.slice(start, end) + after + value.slice(end);
    textarea.selectionStart = start + before.length;
    textarea.selectionEnd = end + before.length;
  }
  textarea.focus();
}

// image_url: paste a URL, or pick / drop a file: it goes up through the storage API and its URL lands here.
function uploader(input) {
  const drop = el("div", { class: "drop", id: "drop" });
  const file = el("input", { type: "file", id: "image-file", accept: "image/png,image/jpeg,image/webp" });
  drop.append(el("span", {}, "Drop an image here or "), file);
  file.addEventListener("change", () => file.files[0] && upload(file.files[0], input, drop));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const dropped = e.dataTransfer.files[0];
    if (dropped) upload(dropped, input, drop);
  });
  return drop;
}

async function upload(file, input, drop) {
  setError("image_url", "");
  drop.dataset.state = "uploading";
  try {
    const initiate = await fetch("/storage/upload/initiate", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ content_type: file.type || "application/octet-stream", file_name: file.name }),
    });
    if (!initiate.ok) throw new Error(await errorText(initiate));
    const { upload_url, file_url } = await initiate.json();
    const put = await fetch(upload_url, { method: "PUT", headers: { "Content-Type": file.type }, body: file });
    if (!put.ok) throw new Error(await errorText(put));
    input.value = file_url;
    drop.querySelector("img")?.remove();
    drop.append(el("img", { src: file_url, alt: file.name }));
    drop.dataset.state = "done";
  } catch (err) {
    setError("image_url", `upload failed: ${err.message}`);
    drop.dataset.state = "failed";
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return `HTTP ${response.status}`;
  }
}

function readInput() {
  const input = {};
  for (const node of $("fields").querySelectorAll("[data-field]")) {
    const raw = node.value.trim();
    if (node.dataset.field === "integer" || node.dataset.field === "number") {
      if (raw !== "") input[node.name] = Number(raw);
    } else if (raw !== "" || node.name === "prompt") {
      input[node.name] = node.value;
    }
  }
  return input;
}

function setError(field, message) {
  const box = $(`error-${field}`);
  if (!box) {
    if (message) $("form-error").textContent = `${field}: ${message}`;
    return;
  }
  box.textContent = message;
  $(`field-${field}`).classList.toggle("invalid", Boolean(message));
}

function clearErrors() {
  for (const box of document.querySelectorAll(".field .error")) setError(box.id.slice("error-".length), "");
  $("form-error").textContent = "";
}

// -- a request: submit, follow the status stream, show the result ------------------------------------------

async function onSubmit(event) {
  event.preventDefault();
  clearErrors();
  const endpoint = ENDPOINTS[mode()];
  const input = readInput();
  const response = await fetch(`/${endpoint.app}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify(input),
  });
  if (!response.ok) {
    $("form-error").textContent = await errorText(response);
    return;
  }
  const handle = await response.json();
  startRun(endpoint.app, input, handle);
}

function startRun(app, input, handle) {
  state.run?.abort.abort();
  const run = { app, input, handle, id: handle.request_id, abort: new AbortController(), started: Date.now(),
                previewSeq: 0 };
  state.run = run;
  $("run-panel").hidden = false;
  $("request-id").textContent = run.id;
  $("logs").textContent = "";
  $("progress").value = 0;
  $("progress").max = 1;
  $("progress-text").textContent = "";
  $("preview-box").hidden = true;
  $("result-box").hidden = true;
  $("snippets").hidden = false;
  $("cancel").disabled = false;
  $("submit").disabled = true;
  document.body.dataset.run = "running";
  renderSnippets(app, input);
  showStatus({ status: handle.status, queue_position: handle.queue_position });
  remember({ id: run.id, app, prompt: input.prompt, at: Date.now(), outcome: "running" });
  followStatus(run).catch((err) => {
    if (err.name === "AbortError") return;
    $("run-status").textContent = `status stream failed: ${err.message}`;
    $("submit").disabled = false;
    done(run, "stream failed");
  });
}

// fal's status stream: `data: {json}` events; each carries only the log lines not sent before.
async function followStatus(run) {
  const url = `${run.handle.status_url}/stream?logs=1`;
  const response = await fetch(url, { headers: authHeaders(), signal: run.abort.signal });
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) await onStatus(run, JSON.parse(data));
    }
  }
}

async function onStatus(run, status) {
  if (state.run !== run) return;
  showStatus(status);
  for (const line of status.logs || []) {
    $("logs").textContent += `${line.timestamp.slice(11, 19)} ${line.level} ${line.message}\n`;
    $("logs").scrollTop = $("logs").scrollHeight;
    const step = /^denoise (\d+)\/(\d+)$/.exec(line.message);
    if (step) {
      $("progress").max = Number(step[2]);
      $("progress").value = Number(step[1]);
      $("progress-text").textContent = `step ${step[1]}/${step[2]}`;
    }
    const preview = /^preview (\d+)\/(\d+)$/.exec(line.message);
    if (preview) showPreview(run, preview[1], preview[2]);
  }
  if (status.status === "COMPLETED") await finish(run, status);
}

function showStatus(status) {
  const text = {
    IN_QUEUE: `In queue, position ${status.queue_position ?? 0}`,
    IN_PROGRESS: "Running",
    COMPLETED: "Completed",
  }[status.status] || status.status;
  $("run-status").textContent = text;
  $("run-status").dataset.status = status.status;
}

// The preview needs the API key, so it is fetched (not an <img src>) and shown from a blob: URL.
async function showPreview(run, step, total) {
  const seq = ++run.previewSeq;
  const response = await fetch(`${run.handle.response_url}/preview`, { headers: authHeaders(), signal: run.abort.signal });
  if (!response.ok || seq !== run.previewSeq) return;
  const blob = await response.blob();
  const img = $("preview");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  img.dataset.step = step;
  $("preview-caption").textContent = `live preview, step ${step}/${total} (latents, no VAE)`;
  $("preview-box").hidden = false;
}

async function finish(run, status) {
  $("cancel").disabled = true;
  $("submit").disabled = false;
  const seconds = status.metrics?.inference_time;
  if (status.error_type === "request_cancelled") {
    $("run-status").textContent = "Cancelled";
    return done(run, "cancelled");
  }
  // Anything else: the result says what happened (fal keeps errors in the result, not in the status).
  const response = await fetch(run.handle.response_url, { headers: authHeaders() });
  const body = await response.json();
  if (response.status === 422 && Array.isArray(body.detail)) {
    for (const item of body.detail) setError(String(item.loc.at(-1)), item.msg);
    $("run-status").textContent = "Invalid input: see the fields";
    return done(run, "invalid input");
  }
  if (!response.ok) {
    $("run-status").textContent = `Failed: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
    return done(run, body.error_type || `HTTP ${response.status}`);
  }
  $("video").src = body.video.url;
  $("download").href = body.video.url;
  $("seed").textContent = body.seed;
  $("elapsed").textContent = seconds != null ? `${seconds.toFixed(1)} s` : "";
  $("result-box").hidden = false;
  $("progress").value = $("progress").max;
  renderSnippets(run.app, { ...run.input, seed: body.seed });
  done(run, "ok", { url: body.video.url, seed: body.seed, seconds });
}

function done(run, outcome, extra = {}) {
  document.body.dataset.run = outcome;
  remember({ id: run.id, app: run.app, prompt: run.input.prompt, at: run.started, outcome, ...extra });
}

async function onCancel() {
  const run = state.run;
  if (!run) return;
  $("cancel").disabled = true;
  const response = await fetch(run.handle.cancel_url, { method: "PUT", headers: authHeaders() });
  if (response.status !== 202) $("run-status").textContent = `cancel: ${(await response.json()).status}`;
}

// -- snippets -------------------------------------------------------------------------------------------------

function renderSnippets(app, input) {
  const origin = location.origin;
  const key = state.config.auth ? ($("key").value.trim() || "id:secret") : "";
  const json = JSON.stringify(input);
  const pretty = JSON.stringify(input, null, 2);
  const auth = key ? ` -H "Authorization: Key $KEY"` : "";
  $("snippet-curl").textContent = [
    `BASE=${origin}${key ? ` KEY=${key}` : ""}`,
    `ID=$(curl -s -X POST $BASE/${app}${auth} -H 'Content-Type: application/json' \\`,
    `     -d '${json.replaceAll("'", "'\\''")}' \\`,
    `     | python3 -c 'import json, sys; print(json.load(sys.stdin)["request_id"])')`,
    `curl -sN "$BASE/fal-ai/ovi/requests/$ID/status/stream?logs=1"${auth}   # until COMPLETED`,
    `curl -s "$BASE/fal-ai/ovi/requests/$ID"${auth}`,
  ].join("\n");
  $("snippet-js").textContent = [
    "// run.mjs (an ES module: top-level await); npm install @fal-ai/client; node run.mjs",
    'import { fal } from "@fal-ai/client";',
    "",
    "fal.config({",
    key ? `  credentials: ${JSON.stringify(key)},` : "",
    `  proxyUrl: { url: "${origin}/api/fal/proxy", when: "always" },`,
    "});",
    `const result = await fal.subscribe("${app}", {`,
    `  input: ${pretty.replaceAll("\n", "\n  ")},`,
    "  logs: true,",
    "  onQueueUpdate: (update) => console.log(update.status, update.logs?.at(-1)?.message ?? \"\"),",
    "});",
    "console.log(result.data.video.url, result.data.seed);",
  ].filter((line) => line !== "").join("\n");
  const pyKey = key || "unused"; // fal-client wants a key; a server without keys ignores it
  const tls = state.config.tls_port ? `${location.hostname}:${state.config.tls_port}` : null;
  $("snippet-python").textContent = [
    "# pip install fal-client; fal-client speaks HTTPS only: the server needs --tls-cert/--tls-key/--tls-port",
    tls
      ? `#   export FAL_QUEUE_RUN_HOST=${tls} FAL_RUN_HOST=${tls}/run FAL_KEY=${pyKey}`
      : `#   export FAL_QUEUE_RUN_HOST=<host>:<tls port> FAL_RUN_HOST=<host>:<tls port>/run FAL_KEY=${pyKey}`,
    "import fal_client",
    "",
    "result = fal_client.subscribe(",
    `    "${app}",`,
    `    arguments=${pyLiteral(input)},`,
    "    with_logs=True,",
    ")",
    'print(result["video"]["url"], result["seed"])',
  ].join("\n");
}

function pyLiteral(value) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(pyLiteral).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyLiteral(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}

function showTab(name) {
  for (const tab of document.querySelectorAll(".tabs button")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const pre of document.querySelectorAll(".snippet")) pre.hidden = pre.id !== `snippet-${name}`;
}

async function copySnippet() {
  const visible = [...document.querySelectorAll(".snippet")].find((pre) => !pre.hidden);
  await navigator.clipboard?.writeText(visible.textContent);
}

// -- history (localStorage) -----------------------------------------------------------------------------------

function loadHistory() {
  try {
    return JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
  } catch {
    return [];
  }
}

function remember(entry) {
  const history = loadHistory().filter((item) => item.id !== entry.id);
  history.unshift(entry);
  localStorage.setItem(HISTORY_KEY, JSON.stringify(history.slice(0, HISTORY_SIZE)));
  renderHistory();
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const item of loadHistory()) {
    const li = el("li", { "data-id": item.id });
    const when = new Date(item.at).toLocaleTimeString();
    li.append(el("span", {}, `${when} ${item.app.replace("fal-ai/", "")} · ${item.outcome} `));
    if (item.url) {
      li.append(el("a", { href: item.url, target: "_blank" }, `video (seed ${item.seed})`));
      li.append(" ");
    }
    li.append(el("span", { class: "prompt" }, (item.prompt || "").slice(0, 80)));
    list.append(li);
  }
}

main().catch((err) => {
  $("form-error").textContent = `the playground could not start: ${err.message}`;
});
