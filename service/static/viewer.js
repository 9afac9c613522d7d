// attnserve viewer: sends the chosen image to the /v1 API and draws the answer's maps over it.
// Plain browser JavaScript, no build step and nothing from elsewhere: the colour tables are the
// published ones in colormaps.json, the file service/overlay.py reads too.
"use strict";

const COMPARE = "__compare__";
const MAIN_SIDE = 384; // the main canvas's longest side, in canvas pixels
const PANEL_SIDE = 224;
const SITE_SIDE = 144;

const state = {
  tables: null, // name -> 256 [r, g, b] in 0..255
  models: [],
  file: null, // the Blob last sent
  fileName: "image",
  image: null, // the decoded image, or null if the browser cannot show its format
  answer: null, // the parsed JSON answer
  answerText: "",
  mode: null, // "single" | "compare"
  selected: -1, // -1: the summary; else the index of a layer in the answer
  busy: false,
};

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- API key (when the server asks)

const KEY_STORE = "attnserve.apiKey";

// fetch() with the API key the user gave, if any (kept for this browser tab only).
function api(url, options = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  const headers = new Headers(options.headers || {});
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return fetch(url, { ...options, headers });
}

// A 401 asks for a key: show the key form; `retry` runs again once a key is entered.
function askForKey(retry) {
  const form = $("key-form");
  form.hidden = false;
  $("api-key").focus();
  form.onsubmit = async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    $("api-key").value = "";
    form.hidden = true;
    showError("");
    try {
      await retry();
    } catch (error) {
      showError(error.message || "Could not reach the server.");
    }
  };
}

// ---------------------------------------------------------------- colour scales and ranges

async function loadTables() {
  const response = await fetch("static/colormaps.json");
  const published = await response.json();
  state.tables = {};
  for (const [name, rows] of Object.entries(published)) {
    state.tables[name] = rows.map((rgb) => rgb.map((v) => Math.round(v * 255)));
  }
}

function colormap() {
  return $("colormap").value;
}

function opacity() {
  return Number($("opacity").value) / 100;
}

// The values at the scale's two ends: [0, 1] stretched to hold the map, symmetric about 0 for a
// diverging scale (the rule of service.overlay.value_range, so both draw alike).
function valueRange(values, name) {
  let low = 0;
  let high = 1;
  for (const v of values) {
    if (v < low) low = v;
    if (v > high) high = v;
  }
  if (name === "berlin") {
    const bound = Math.max(-low, high);
    return [-bound, bound];
  }
  return [low, high];
}

function colour(value, low, high, table) {
  const index = Math.min(255, Math.max(0, Math.round(((value - low) / (high - low)) * 255)));
  return table[index];
}

// A 2-D map {shape: [rows, cols], data} as a canvas with one opaque pixel per cell.
function mapCanvas(entry, name) {
  const [rows, cols] = entry.shape;
  const flat = entry.data.flat();
  const [low, high] = valueRange(flat, name);
  const table = state.tables[name];
  const canvas = document.createElement("canvas");
  canvas.width = cols;
  canvas.height = rows;
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(cols, rows);
  flat.forEach((v, i) => {
    const [r, g, b] = colour(v, low, high, table);
    pixels.data.set([r, g, b, 255], i * 4);
  });
  ctx.putImageData(pixels, 0, 0);
  return { canvas, low, high };
}

function fitSize(width, height, side) {
  const scale = side / Math.max(width, height);
  return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
}

// The image (or a grey field if the browser cannot show it) with `entry` over it.
function drawOverlay(canvas, entry, side, answerImage) {
  const width = state.image ? state.image.naturalWidth : answerImage.width;
  const height = state.image ? state.image.naturalHeight : answerImage.height;
  const [w, h] = fitSize(width, height, side);
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = w < width * 2; // keep small digits' pixels sharp when enlarged
  if (state.image) {
    ctx.drawImage(state.image, 0, 0, w, h);
  } else {
    ctx.fillStyle = "#777";
    ctx.fillRect(0, 0, w, h);
  }
  if (!entry) return null;
  const drawn = mapCanvas(entry, colormap());
  ctx.imageSmoothingEnabled = true; // map cells are samples at cell centres: bilinear between
  ctx.globalAlpha = opacity();
  ctx.drawImage(drawn.canvas, 0, 0, w, h);
  ctx.globalAlpha = 1;
  return drawn;
}

// ---------------------------------------------------------------- requests

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(message, busy) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("busy", Boolean(busy));
  state.busy = Boolean(busy);
  for (const id of ["model", "file"]) $(id).disabled = Boolean(busy);
  document.querySelectorAll(".example").forEach((b) => (b.disabled = Boolean(busy)));
  document.querySelectorAll(".results").forEach((s) => s.setAttribute("aria-busy", String(busy)));
}

// A readable sentence for an error answer {error, detail}.
function describeError(status, body) {
  let detail = body && body.detail;
  if (Array.isArray(detail)) detail = detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  if (detail && typeof detail !== "string") detail = JSON.stringify(detail);
  const lead = {
    400: "The server could not read this file as an image",
    401: "This server needs an API key (enter it above)",
    403: "This API key may not do that",
    404: "No such model",
    413: "The image is too large for the server",
    415: "This file type is not accepted",
    422: "Invalid request options",
    503: "The server is busy or still loading; try again in a moment",
    504: "The server did not answer in time",
  }[status] || "The request failed";
  return `${lead} (${status}${body && body.error ? " " + body.error : ""})${detail ? ": " + detail : ""}`;
}

async function loadModels() {
  const response = await api("v1/models");
  if (response.status === 401) {
    askForKey(loadModels);
    throw new Error(describeError(401, await safeJson(response)));
  }
  if (!response.ok) throw new Error(describeError(response.status, await safeJson(response)));
  state.models = (await response.json()).models;
  const select = $("model");
  select.textContent = "";
  const list = $("models");
  list.textContent = "";
  for (const model of state.models) {
    const trained = model.random_weights ? "random weights" : "trained";
    select.append(new Option(`${model.name} (${model.attention})`, model.name));
    const item = document.createElement("li");
    item.textContent = `${model.name}: block ${model.attention}, ${trained}, ${model.status}`;
    list.append(item);
  }
  select.append(new Option("Compare all models", COMPARE));
  const first = state.models.find((m) => m.attention !== "none") || state.models[0];
  if (first) select.value = first.name;
  select.disabled = false;
}

async function safeJson(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}

function decodeLocally(blob) {
  return new Promise((resolve) => {
    const url = URL.createObjectURL(blob);
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => resolve(null);
    image.src = url;
  });
}

async function run() {
  if (!state.file || state.busy) return;
  const model = $("model").value;
  const compare = model === COMPARE;
  const url = compare
    ? "v1/compare?maps=summary&top_k=1"
    : `v1/models/${encodeURIComponent(model)}/predict?maps=all&top_k=5`;
  const form = new FormData();
  form.append("image", state.file, state.fileName);
  showError("");
  setStatus(compare ? "Running every model…" : `Running ${model}…`, true);
  try {
    const [response, image] = await Promise.all([
      api(url, { method: "POST", body: form }),
      decodeLocally(state.file),
    ]);
    const text = await response.text();
    if (response.status === 401) askForKey(run);
    if (!response.ok) {
      let body = null;
      try {
        body = JSON.parse(text);
      } catch {
        body = null;
      }
      throw new Error(describeError(response.status, body));
    }
    state.image = image;
    state.answer = JSON.parse(text);
    state.answerText = text;
    state.mode = compare ? "compare" : "single";
    state.selected = -1;
    render();
    const note = image ? "" : " (the browser cannot display this image format; maps only)";
    setStatus(`Done${note}.`, false);
  } catch (error) {
    setStatus("", false);
    const message = error instanceof TypeError ? "Could not reach the server." : error.message;
    showError(message);
    $("single").hidden = true;
    $("compare").hidden = true;
    state.answer = null;
  } finally {
    // A count of finished requests, so a script (or a test) can wait for the next answer.
    document.body.dataset.finished = String(Number(document.body.dataset.finished || 0) + 1);
  }
}

async function useFile(blob, name) {
  state.file = blob;
  state.fileName = name || "image";
  await run();
}

// ---------------------------------------------------------------- rendering

function render() {
  if (!state.answer) return;
  $("single").hidden = state.mode !== "single";
  $("compare").hidden = state.mode !== "compare";
  if (state.mode === "single") renderSingle();
  else renderCompare();
}

function imageLayers(result) {
  // A layer is drawn on the image when it is a 2-D map on the summary's grid: the answer's
  // spatial views all share that grid, the raw gates (maps=all) keep their native shapes.
  const attention = result.attention;
  const layers = (attention && attention.layers) || [];
  const summary = attention && attention.summary;
  return layers
    .map((layer, index) => ({ layer, index }))
    .filter(
      ({ layer }) =>
        summary &&
        layer.data &&
        layer.shape.length === 2 &&
        layer.shape[0] === summary.shape[0] &&
        layer.shape[1] === summary.shape[1] &&
        layer.kind !== "region",
    );
}

function renderSingle() {
  const result = state.answer.results[0];
  renderPredictions(result.predictions);
  renderMain();
  renderSites(result);
  renderGates(result);
}

function selectedEntry(result) {
  const attention = result.attention;
  if (!attention) return null;
  return state.selected < 0 ? attention.summary : attention.layers[state.selected];
}

function layerName(layer) {
  return `${layer.layer} · ${layer.block} · ${layer.kind}${layer.derived ? " · derived" : ""}`;
}

function renderMain() {
  const result = state.answer.results[0];
  const entry = selectedEntry(result);
  const canvas = $("overlay");
  const drawn = drawOverlay(canvas, entry, MAIN_SIDE, result.image);
  drawRegions(canvas, result);
  const title = state.selected < 0 ? "summary map" : layerName(entry);
  $("map-title").textContent = entry ? title : "no attention map (this model has no attention)";
  const low = drawn ? drawn.low : 0;
  const high = drawn ? drawn.high : 1;
  $("legend-low").textContent = formatValue(low);
  $("legend-high").textContent = formatValue(high);
  drawLegend();
}

function drawLegend() {
  const canvas = $("legend");
  const ctx = canvas.getContext("2d");
  const table = state.tables[colormap()];
  for (let x = 0; x < canvas.width; x++) {
    const [r, g, b] = table[Math.round((x / (canvas.width - 1)) * 255)];
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(x, 0, 1, canvas.height);
  }
}

function formatValue(v) {
  return Number(v.toPrecision(3)).toString();
}

// Region-type attention (a spatial transformer's sampled quadrilateral) as a polygon: its
// corners in pixels of the original image.
function drawRegions(canvas, result) {
  const layers = (result.attention && result.attention.layers) || [];
  const width = state.image ? state.image.naturalWidth : result.image.width;
  const sx = canvas.width / width;
  const sy = canvas.height / (state.image ? state.image.naturalHeight : result.image.height);
  const ctx = canvas.getContext("2d");
  for (const layer of layers) {
    if (layer.kind !== "region") continue;
    const corners = layer.image_points || layer.points || layer.data;
    if (!Array.isArray(corners) || corners.length < 3) continue;
    ctx.beginPath();
    corners.forEach(([x, y], i) => (i ? ctx.lineTo(x * sx, y * sy) : ctx.moveTo(x * sx, y * sy)));
    ctx.closePath();
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#ff3b30";
    ctx.stroke();
  }
}

function renderPredictions(predictions) {
  const list = $("predictions");
  list.textContent = "";
  for (const p of predictions) {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `${(p.probability * 100).toFixed(1)} percent`);
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, p.probability)) * 100}%`;
    bar.append(fill);
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = `${(p.probability * 100).toFixed(1)} %`;
    item.append(label, bar, prob);
    list.append(item);
  }
}

function siteButton(text, derived, selected, onPick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "site";
  button.setAttribute("aria-pressed", String(selected));
  const canvas = document.createElement("canvas");
  const caption = document.createElement("span");
  caption.textContent = text;
  if (derived) caption.classList.add("derived");
  button.append(canvas, caption);
  button.addEventListener("click", onPick);
  return { button, canvas };
}

function renderSites(result) {
  const sites = $("sites");
  sites.textContent = "";
  const attention = result.attention;
  if (!attention || !attention.summary) {
    sites.textContent = "This model has no attention map.";
    return;
  }
  const pick = (index) => () => {
    state.selected = index;
    renderMain();
    sites.querySelectorAll(".site").forEach((b) => {
      b.setAttribute("aria-pressed", String(Number(b.dataset.index) === index));
    });
  };
  const summary = siteButton("summary (all sites)", false, state.selected < 0, pick(-1));
  summary.button.dataset.index = "-1";
  drawOverlay(summary.canvas, attention.summary, SITE_SIDE, result.image);
  sites.append(summary.button);
  for (const { layer, index } of imageLayers(result)) {
    const site = siteButton(layerName(layer), layer.derived, state.selected === index, pick(index));
    site.button.dataset.index = String(index);
    site.button.setAttribute("aria-label", `Show ${layerName(layer)} large`);
    drawOverlay(site.canvas, layer, SITE_SIDE, result.image);
    sites.append(site.button);
  }
}

// Channel gates (maps=all): one bar per channel, height and colour by value.
function renderGates(result) {
  const gates = $("gates");
  gates.textContent = "";
  const layers = ((result.attention && result.attention.layers) || []).filter(
    (l) => l.data && l.shape.length === 1,
  );
  if (!layers.length) {
    gates.textContent = "This model has no channel gates.";
    return;
  }
  const table = state.tables[colormap()];
  for (const layer of layers) {
    const figure = document.createElement("figure");
    const canvas = document.createElement("canvas");
    const values = layer.data;
    const [low, high] = valueRange(values, colormap());
    canvas.width = Math.max(values.length * 4, 200);
    canvas.height = 40;
    const ctx = canvas.getContext("2d");
    const step = canvas.width / values.length;
    values.forEach((v, i) => {
      const [r, g, b] = colour(v, low, high, table);
      const height = Math.max(1, ((v - low) / (high - low)) * canvas.height);
      ctx.fillStyle = `rgb(${r},${g},${b})`;
      ctx.fillRect(i * step, canvas.height - height, Math.max(1, step - 0.5), height);
    });
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `${layerName(layer)}: ${values.length} gates`);
    const caption = document.createElement("figcaption");
    caption.textContent = `${layerName(layer)}: ${values.length} values, ${formatValue(low)} to ${formatValue(high)}`;
    canvas.addEventListener("mousemove", (event) => {
      const rect = canvas.getBoundingClientRect();
      const i = Math.floor(((event.clientX - rect.left) / rect.width) * values.length);
      if (i >= 0 && i < values.length) {
        caption.textContent = `${layerName(layer)}: channel ${i} = ${values[i]}`;
      }
    });
    figure.append(canvas, caption);
    gates.append(figure);
  }
}

function renderCompare() {
  const panels = $("panels");
  panels.textContent = "";
  const blocks = Object.fromEntries(state.models.map((m) => [m.name, m.attention]));
  for (const result of state.answer.results) {
    const figure = document.createElement("figure");
    figure.className = "panel";
    figure.dataset.model = result.model;
    const canvas = document.createElement("canvas");
    canvas.setAttribute("aria-label", `${result.model}: summary map over the image`);
    drawOverlay(canvas, result.attention && result.attention.summary, PANEL_SIDE, result.image);
    const caption = document.createElement("figcaption");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = `${result.model} (${blocks[result.model] || "?"})`;
    const top = result.predictions[0];
    const prediction = document.createElement("span");
    prediction.className = "top";
    prediction.textContent = top ? `${top.label}: ${(top.probability * 100).toFixed(1)} %` : "";
    caption.append(name, prediction);
    figure.append(canvas, caption);
    panels.append(figure);
  }
}

// ---------------------------------------------------------------- hover and export

function onHover(event) {
  if (!state.answer || state.mode !== "single") return;
  const result = state.answer.results[0];
  const entry = selectedEntry(result);
  const readout = $("hover");
  if (!entry || !entry.data) return;
  const canvas = $("overlay");
  const rect = canvas.getBoundingClientRect();
  const fx = (event.clientX - rect.left) / rect.width;
  const fy = (event.clientY - rect.top) / rect.height;
  const [rows, cols] = entry.shape;
  const row = Math.min(rows - 1, Math.max(0, Math.floor(fy * rows)));
  const col = Math.min(cols - 1, Math.max(0, Math.floor(fx * cols)));
  const x = Math.floor(fx * result.image.width);
  const y = Math.floor(fy * result.image.height);
  readout.textContent = `value ${entry.data[row][col]} at pixel (${x}, ${y})`;
}

function download(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function stem() {
  return state.fileName.replace(/\.[^.]*$/, "") || "image";
}

function downloadJson() {
  if (!state.answerText) return;
  download(new Blob([state.answerText], { type: "application/json" }), `${stem()}.json`);
}

function downloadPng() {
  if (!state.answer) return;
  $("overlay").toBlob((blob) => blob && download(blob, `${stem()}-overlay.png`), "image/png");
}

// ---------------------------------------------------------------- wiring

function wire() {
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) useFile(file, file.name);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) useFile(file, file.name);
  });
  document.querySelectorAll(".example").forEach((button) => {
    button.addEventListener("click", async () => {
      const response = await fetch(button.dataset.src);
      useFile(await response.blob(), button.dataset.src.split("/").pop());
    });
  });
  $("model").addEventListener("change", run);
  $("colormap").addEventListener("change", render);
  $("opacity").addEventListener("input", () => {
    $("opacity-value").textContent = `${$("opacity").value} %`;
    render();
  });
  $("overlay").addEventListener("mousemove", onHover);
  $("download-json").addEventListener("click", downloadJson);
  $("download-json-compare").addEventListener("click", downloadJson);
  $("download-png").addEventListener("click", downloadPng);
}

async function main() {
  wire();
  try {
    await Promise.all([loadTables(), loadModels()]);
    setStatus("Choose an image or an example.", false);
  } catch (error) {
    showError(error.message || "Could not reach the server.");
  }
  document.body.dataset.ready = "true";
}

main();
