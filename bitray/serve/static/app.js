// bitray's search page: plain JavaScript, no build step, no external resources.
//
// The query is either an uploaded image (kept in memory, so k can change without a new upload) or a
// path the index holds; a path query and k live in the URL (?path=...&k=...) so a result can be shared
// and reloaded. URLs are relative, so the page also works behind a route prefix.
// An optional config.max_bytes refuses larger uploads before sending them.
// document.body.dataset.state is "idle", "loading", "done" or "error" (the browser test waits on it).
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  config: { index: true, classifier: null, k_max: 100, k_default: 10 }, // until GET /config answers
  query: null, // {file: Blob, name} or {path}
  controller: null,
  objectUrl: null,
};

const uploads = []; // the uploaded queries of this page's history entries

class RequestError extends Error {}

async function request(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new RequestError("the server could not be reached; is bitray serve still running?");
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json().catch(() => null) : null;
  if (!response.ok) {
    const reason = body && body.error ? body.error : `${response.status} ${response.statusText}`.trim();
    throw new RequestError(reason);
  }
  if (body === null) throw new RequestError(`unexpected answer from ${url} (${type || "no content type"})`);
  return body;
}

function baseName(path) {
  const parts = String(path).split(/[\\/]/).filter(Boolean);
  return parts.length ? parts[parts.length - 1] : String(path);
}

function thumbnailUrl(path) {
  return `thumbnail?path=${encodeURIComponent(path)}`;
}

function clampK(value) {
  const k = Number.parseInt(value, 10);
  if (!Number.isFinite(k) || k < 1) return Math.min(state.config.k_default || 10, state.config.k_max);
  return Math.min(k, state.config.k_max);
}

function setState(name, message) {
  document.body.dataset.state = name;
  $("results").setAttribute("aria-busy", String(name === "loading"));
  $("status").textContent = message || "";
}

function showError(message) {
  $("error").textContent = `Could not search: ${message}`;
  $("error").hidden = false;
  $("results-box").hidden = true;
  $("current").hidden = true;
  setState("error", "");
}

function writeUrl(push) {
  const params = new URLSearchParams();
  if (state.query && state.query.path) params.set("path", state.query.path);
  params.set("k", String(clampK($("k").value)));
  const url = `${location.pathname}?${params}`;
  // An upload cannot live in the URL (nor in history.state: Chrome drops Blobs there); its history entry
  // names it in this page's memory, so Back and Forward return to it while the page stays open.
  let entry = null;
  if (state.query && state.query.file) {
    if (state.query.id === undefined) state.query.id = uploads.push(state.query) - 1;
    entry = { upload: state.query.id };
  }
  if (push) history.pushState(entry, "", url);
  else history.replaceState(entry, "", url);
}

function showQuery(query) {
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = query.file ? URL.createObjectURL(query.file) : null;
  $("query-image").src = query.file ? state.objectUrl : thumbnailUrl(query.path);
  $("query-image").alt = `Query: ${query.file ? query.name : baseName(query.path)}`;
  $("query-name").textContent = query.file ? `${query.name} (uploaded)` : query.path;
  $("query-name").title = query.path || query.name;
  $("current").hidden = false;
}

function renderLabels(labels) {
  const list = $("labels");
  list.replaceChildren();
  $("labels-box").hidden = !labels || labels.length === 0;
  for (const { label, score } of labels || []) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "label-name";
    name.textContent = label;
    const bar = document.createElement("meter");
    bar.min = 0;
    bar.max = 1;
    bar.value = score;
    bar.setAttribute("aria-label", `${label} score`);
    const value = document.createElement("span");
    value.className = "label-score";
    value.textContent = score.toFixed(3);
    item.append(name, bar, value);
    list.append(item);
  }
}

function renderResults(neighbours) {
  const list = $("results");
  list.replaceChildren();
  for (const { path, similarity, width, height } of neighbours) {
    const name = baseName(path);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "result";
    button.dataset.path = path;
    button.title = `${path}\nSearch by this image`;
    button.setAttribute("aria-label", `Search by ${name}, similarity ${similarity.toFixed(3)}`);
    const img = document.createElement("img");
    img.src = thumbnailUrl(path);
    img.alt = "";
    img.loading = "lazy";
    img.decoding = "async";
    const caption = document.createElement("span");
    caption.className = "name";
    caption.textContent = name;
    const meta = document.createElement("span");
    meta.className = "meta";
    const sim = document.createElement("span");
    sim.className = "sim";
    sim.textContent = similarity.toFixed(3);
    meta.append(sim);
    if (width && height) meta.append(` · ${width}×${height}`);
    button.append(img, caption, meta);
    const item = document.createElement("li");
    item.append(button);
    list.append(item);
  }
  $("results-box").hidden = false;
}

async function run(query) {
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  state.query = query;
  const k = clampK($("k").value);
  $("k").value = String(k);
  $("error").hidden = true;
  showQuery(query);
  setState("loading", query.file ? `Searching for ${query.name}…` : `Searching for ${baseName(query.path)}…`);
  const started = performance.now();
  const { signal } = controller;
  try {
    let neighbours = null;
    let labels = null;
    if (state.config.index) {
      const answer = query.file
        ? await request(`search?k=${k}`, { method: "POST", body: query.file, signal, headers: rawHeaders(query) })
        : await request("search", {
            method: "POST",
            body: JSON.stringify({ path: query.path, k }),
            headers: { "Content-Type": "application/json" },
            signal,
          });
      neighbours = answer.neighbours || [];
      labels = answer.labels || null;
    }
    if (state.config.classifier && !labels && query.file) {
      labels = (await request(`classify?k=${k}`, { method: "POST", body: query.file, signal, headers: rawHeaders(query) }))
        .labels;
    }
    if (controller.signal.aborted) return;
    renderLabels(labels);
    if (neighbours) renderResults(neighbours);
    const ms = Math.round(performance.now() - started);
    const found = neighbours ? `${neighbours.length} neighbour${neighbours.length === 1 ? "" : "s"}` : "Classified";
    setState("done", `${found} in ${ms} ms.`);
  } catch (err) {
    if (err.name === "AbortError") return;
    showError(err instanceof RequestError ? err.message : String(err));
  }
}

function rawHeaders(query) {
  return { "Content-Type": query.file.type || "application/octet-stream" };
}

function megabytes(bytes) {
  return `${(bytes / 1e6).toFixed(1)} MB`;
}

function upload(file) {
  if (!file) return;
  const name = file.name || "pasted image";
  const limit = state.config.max_bytes;
  if (limit && file.size > limit) {
    state.query = null;
    showError(`${name} is ${megabytes(file.size)}, over this server's limit of ${megabytes(limit)}`);
    return;
  }
  run({ file, name });
  writeUrl(true);
}

function searchPath(path, push) {
  run({ path });
  writeUrl(push);
}

function reset() {
  if (state.controller) state.controller.abort();
  state.query = null;
  for (const id of ["error", "current", "results-box"]) $(id).hidden = true;
  setState("idle", "");
}

function fromUrl(entry) {
  const params = new URLSearchParams(location.search);
  if (params.has("k")) $("k").value = String(clampK(params.get("k")));
  const path = params.get("path");
  if (path) run({ path });
  else if (entry && uploads[entry.upload]) run(uploads[entry.upload]);
  else reset();
}

function describe(config) {
  const parts = [`Model ${config.model}`];
  if (config.dim) parts.push(`${config.dim}-dimensional embeddings`);
  parts.push(config.index ? "searching an index" : "no index served");
  if (config.classifier) {
    parts.push(typeof config.classifier === "string" ? `classifier ${config.classifier}` : "with a classifier");
  }
  $("model").textContent = `${parts.join(" · ")}.`;
  $("k").max = String(config.k_max);
  $("k").value = String(clampK(config.k_default || 10));
  if (!config.index) {
    document.querySelector(".drop-title").textContent = "Drop an image here, or choose one, to classify it";
  }
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => upload(event.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    upload(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (item) upload(item);
  });
  $("results").addEventListener("click", (event) => {
    const button = event.target.closest("button.result");
    if (button) searchPath(button.dataset.path, true);
  });
  $("k").addEventListener("change", () => {
    $("k").value = String(clampK($("k").value));
    writeUrl(false);
    if (state.query) run(state.query);
  });
  $("query").addEventListener("submit", (event) => event.preventDefault());
  window.addEventListener("popstate", (event) => fromUrl(event.state));
}

async function main() {
  setState("idle", "");
  wire();
  try {
    state.config = await request("config");
    describe(state.config);
  } catch (err) {
    showError(`reading the server's settings: ${err.message}`);
    return;
  }
  fromUrl(history.state);
}

main();
