// The demo page. For each chosen or dropped image: POST /v1/search (multipart, thumbnails) returns the
// neighbours and the query's own sparse code with its OOD verdict (POST /v1/embed when the server has no index).
// The status panel reads GET /v1/info and, when the server has it, GET /v1/drift. Fields a server does not send
// (an older server, or a model without calibration) leave their part of the page out instead of breaking it.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";
const RECENT_MAX = 40; // l0 values of this page's uploads kept for the status chart
const page = { info: null, drift: null, recent: [], pending: 0 };

// ------------------------------------------------------------------------------------------ HTTP
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  return $("api-key").value.trim() || localStorage.getItem("lpjepa-api-key") || "";
}

async function call(path, options = {}) {
  const key = apiKey();
  const headers = { ...(options.headers || {}), ...(key ? { Authorization: "Bearer " + key } : {}) };
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, "network", err.message || "network error");
  }
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const detail = body && body.error ? body.error : {};
    throw new ApiError(response.status, detail.code || "", detail.message || response.statusText || "");
  }
  return body;
}

// What a failed request means, in words a user can act on.
function explain(err) {
  const why = err.message ? ` (${err.message})` : "";
  switch (err.status) {
    case 0: return "Could not reach the server: is it still running?" + why;
    case 401: return "This server needs an API key: enter it in the API key field and try again." + why;
    case 409: return "The server cannot do this right now" + why;
    case 413: return "Too large for this server: use a smaller image or fewer at once" + why;
    case 415: return "Not an image this server accepts: it takes PNG, JPEG, WebP, BMP, GIF or TIFF files" + why;
    case 422: return "The server could not use this file" + why;
    case 429:
    case 503: return "The server is busy, still loading or shutting down: try again in a moment" + why;
    default: return `The request failed (HTTP ${err.status})` + why;
  }
}

// ------------------------------------------------------------------------------------------ formatting
const pct = (x) => (100 * x).toFixed(x < 0.1 ? 2 : 1) + "%";
const num = (x, digits = 3) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "n/a");
const isNum = (x) => typeof x === "number" && Number.isFinite(x);

function targetL0() {
  const info = page.info || {};
  if (isNum(info.target_l0)) return info.target_l0;
  if (info.model && isNum(info.model.expected_l0)) return info.model.expected_l0;
  return null;
}

function servedScoreName() {
  const ood = (page.info && page.info.ood) || {};
  return ood.served || ood.score_name || null;
}

function label(payload) {
  if (payload === null || payload === undefined) return null;
  if (typeof payload !== "object") return String(payload);
  for (const key of ["class", "name", "title", "label"]) {
    if (payload[key] !== undefined && payload[key] !== null) return String(payload[key]);
  }
  return null;
}

function svg(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

// ------------------------------------------------------------------------------------------ status panel
async function loadInfo() {
  try {
    page.info = await call("/v1/info");
  } catch (err) {
    $("st-model").textContent = "unavailable: " + explain(err);
    return;
  }
  const info = page.info;
  const m = info.model || {};
  const parts = [m.method, m.backbone, `${info.dim} dims`, m.precision].filter(Boolean);
  $("st-model").textContent = parts.join(" \u00b7 ");
  const size = isNum(info.index_size) ? info.index_size : info.index ? info.index.size : null;
  $("st-index").textContent = size === null ? "none (search is off)" : `${size.toLocaleString("en")} items`;
  $("st-backend").textContent = info.backend || (info.index && info.index.backend) || "\u2013";
  const target = targetL0();
  $("st-target").textContent = target === null ? "not set by this model" : pct(target);
  if (info.ood_calibrated && info.ood) {
    const name = servedScoreName();
    $("st-ood").textContent = `${name || "score"} > ${num(info.ood.threshold)} flags an input`;
  } else {
    $("st-ood").textContent = "not calibrated";
  }
  await loadDrift();
}

async function loadDrift() {
  let drift = null;
  try {
    drift = await call("/v1/drift");
  } catch (err) {
    page.drift = null;
    $("st-drift").textContent = err.status === 404 ? "not reported by this server" : explain(err);
    $("st-drift").dataset.state = "unknown";
    drawRecent();
    return;
  }
  page.drift = drift;
  const el = $("st-drift");
  el.title = drift.test ? `test: ${drift.test}` : "";
  if (!drift.enabled) {
    const calibrated = page.info && page.info.ood_calibrated;
    el.textContent = calibrated ? "off (this model's calibration has no drift reference)"
      : "off (the model has no OOD calibration)";
    el.dataset.state = "off";
  } else if (!drift.window_count) {
    el.textContent = `watching; no traffic yet (window of ${drift.window_size} inputs)`;
    el.dataset.state = "ok";
  } else if (!isNum(drift.pvalue)) {
    el.textContent = `collecting: ${drift.window_count} of ${drift.window_size} inputs for the first test`;
    el.dataset.state = "ok";
  } else {
    const p = `p = ${drift.pvalue.toPrecision(2)}, `;
    const rate = isNum(drift.false_alarm_rate) ? ` at false-alarm rate ${drift.false_alarm_rate}` : "";
    const seen = `${drift.window_count}/${drift.window_size} recent inputs`;
    el.textContent = (drift.alarm ? "ALARM: recent traffic has drifted" : "no drift") + ` (${p}${seen}${rate})`;
    el.dataset.state = drift.alarm ? "alarm" : "ok";
  }
  drawRecent();
}

function drawRecent() {
  const chart = $("recent-chart");
  const target = targetL0();
  const values = page.recent;
  chart.replaceChildren();
  const top = Math.max(1e-6, target === null ? 0 : 2 * target, ...values.map((v) => 1.15 * v));
  const y = (v) => 58 - (54 * v) / top;
  if (target !== null) {
    chart.appendChild(svg("line", { x1: 0, x2: 200, y1: y(target), y2: y(target), class: "target-line" }));
  }
  if (values.length) {
    const step = values.length > 1 ? 196 / (values.length - 1) : 0;
    const points = values.map((v, i) => `${2 + i * step},${y(v)}`).join(" ");
    chart.appendChild(svg("polyline", { points, class: "recent-line" }));
    values.forEach((v, i) => chart.appendChild(svg("circle", { cx: 2 + i * step, cy: y(v), r: 1.8, class: "dot" })));
  }
  const parts = [];
  if (values.length) {
    const mean = values.reduce((a, b) => a + b, 0) / values.length;
    parts.push(`this page: mean l0 ${pct(mean)} over ${values.length} image${values.length > 1 ? "s" : ""}`);
  }
  if (page.drift && isNum(page.drift.window_l0)) parts.push(`server window: ${pct(page.drift.window_l0)}`);
  if (target !== null) parts.push(`target ${pct(target)} (dashed)`);
  $("recent-summary").textContent = parts.length ? parts.join("; ") : "No uploads yet.";
}

// ------------------------------------------------------------------------------------------ one result card
function newCard(file) {
  const card = $("result-template").content.firstElementChild.cloneNode(true);
  card.dataset.name = file.name;
  card.querySelector(".name").textContent = file.name || "image";
  const preview = card.querySelector(".preview");
  preview.src = URL.createObjectURL(file);
  preview.alt = `uploaded image ${file.name}`;
  preview.addEventListener("error", () => { preview.hidden = true; }, { once: true });
  return card;
}

function drawCode(card, emb) {
  const q = (sel) => card.querySelector(sel);
  const target = targetL0();
  let text = `l0 = ${pct(emb.l0)}: ${emb.nnz} of ${emb.dim} dimensions active`;
  if (target !== null) {
    const ratio = target > 0 ? emb.l0 / target : null;
    text += ` \u00b7 target ${pct(target)}` + (ratio === null ? "" : ` (${ratio.toFixed(2)}\u00d7 the target)`);
  }
  q(".l0").textContent = text;
  const scale = Math.min(1, Math.max(0.02, 1.5 * emb.l0, target === null ? 0 : 2 * target));
  q(".l0-bar").style.width = `${(100 * Math.min(emb.l0, scale)) / scale}%`;
  const marker = q(".l0-target");
  marker.hidden = target === null;
  if (target !== null) marker.style.left = `${(100 * target) / scale}%`;

  const chart = q(".code-chart");
  const dim = emb.dim;
  const values = new Map(emb.indices.map((d, i) => [d, emb.values[i]]));
  const max = Math.max(1e-12, ...emb.values);
  chart.setAttribute("viewBox", `0 0 ${dim} 100`);
  chart.setAttribute("aria-label", `sparse code: ${emb.nnz} of ${dim} dimensions active, bar height = value`);
  chart.replaceChildren();
  for (let d = 0; d < dim; d++) {
    const v = values.get(d) || 0;
    const h = v > 0 ? Math.max(3, (97 * v) / max) : 1;
    const rect = svg("rect", { x: d + 0.08, width: 0.84, y: 100 - h, height: h, class: v > 0 ? "on" : "off" });
    rect.dataset.dim = d;
    if (v > 0) {
      const title = svg("title");
      title.textContent = `dim ${d}: ${v.toFixed(4)}`;
      rect.appendChild(title);
    }
    chart.appendChild(rect);
  }
  const top = emb.indices.map((d, i) => [d, emb.values[i]]).sort((a, b) => b[1] - a[1]).slice(0, 16);
  q(".active-dims").replaceChildren(...top.map(([d, v]) => {
    const li = document.createElement("li");
    li.textContent = `dim ${d}: ${v.toFixed(3)}`;
    return li;
  }));
  q(".code").hidden = false;
}

function drawOOD(card, emb) {
  const badge = card.querySelector(".ood-badge");
  badge.hidden = false;
  if (!isNum(emb.ood_score)) {
    badge.textContent = "OOD: not scored (the model has no calibration)";
    badge.className = "ood-badge badge";
    badge.dataset.verdict = "none";
    return;
  }
  const name = emb.ood_score_name || servedScoreName();
  const threshold = isNum(emb.ood_threshold) ? emb.ood_threshold : page.info && page.info.ood
    ? page.info.ood.threshold : null;
  const verdict = emb.is_ood ? "Out of distribution" : "In distribution";
  const compare = threshold === null ? "" : ` ${emb.is_ood ? ">" : "\u2264"} threshold ${num(threshold)}`;
  badge.textContent = `${verdict}: ${name ? name + " score" : "score"} ${num(emb.ood_score)}${compare}`;
  badge.className = "ood-badge badge " + (emb.is_ood ? "ood" : "in");
  badge.dataset.verdict = emb.is_ood ? "ood" : "in";
}

function drawNeighbours(card, results) {
  const list = card.querySelector(".neighbours");
  list.replaceChildren(...results.map((hit, i) => {
    const li = document.createElement("li");
    li.className = "hit";
    li.dataset.id = hit.id;
    const figure = document.createElement("figure");
    const name = label(hit.payload);
    if (hit.thumbnail) {
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + hit.thumbnail;
      img.alt = `neighbour ${i + 1}: ${name || "item " + hit.id}`;
      img.width = 72;
      img.height = 72;
      figure.appendChild(img);
    } else {
      const box = document.createElement("div");
      box.className = "noimg";
      box.textContent = "no thumbnail";
      figure.appendChild(box);
    }
    const caption = document.createElement("figcaption");
    const title = document.createElement("span");
    title.className = "hit-label";
    title.textContent = name || `item ${hit.id}`;
    const meta = document.createElement("span");
    meta.className = "hit-meta";
    meta.textContent = `${num(hit.score)}\u2002#${hit.id}`;
    meta.title = `score ${num(hit.score, 4)}, item id ${hit.id}`;
    caption.append(title, meta);
    figure.appendChild(caption);
    if (hit.payload !== null && hit.payload !== undefined) figure.title = JSON.stringify(hit.payload);
    li.appendChild(figure);
    return li;
  }));
  const withThumbs = results.filter((h) => h.thumbnail).length;
  let note = results.length ? `${results.length} nearest by score, best first` : "The index is empty.";
  if (results.length && withThumbs < results.length) note += ` (${results.length - withThumbs} without a thumbnail)`;
  card.querySelector(".neighbour-note").textContent = note;
  card.querySelector(".neighbours-block").hidden = false;
}

function fail(card, err) {
  card.dataset.state = "error";
  card.dataset.status = err.status;
  card.querySelector(".progress").hidden = true;
  card.querySelector(".code").hidden = true;
  card.querySelector(".neighbours-block").hidden = true;
  const box = card.querySelector(".error");
  box.textContent = explain(err);
  box.hidden = false;
}

function kValue() {
  const max = (page.info && page.info.limits && page.info.limits.max_k) || 50;
  return Math.max(1, Math.min(max, parseInt($("k").value, 10) || 8));
}

async function searchOrEmbed(file) {
  const hasIndex = page.info && (page.info.index || isNum(page.info.index_size));
  if (hasIndex) {
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("k", String(kValue()));
    form.append("thumbnails", "true");
    try {
      const found = await call("/v1/search", { method: "POST", body: form });
      return { embedding: found.query, results: found.results };
    } catch (err) {
      if (err.code !== "no_index") throw err;
    }
  }
  const form = new FormData();
  form.append("files", file, file.name);
  const embedded = await call("/v1/embed", { method: "POST", body: form });
  return { embedding: embedded.embeddings[0], results: null };
}

async function processFile(card, file) {
  try {
    const { embedding, results } = await searchOrEmbed(file);
    card.querySelector(".progress").hidden = true;
    drawCode(card, embedding);
    drawOOD(card, embedding);
    if (results) {
      drawNeighbours(card, results);
    } else {
      card.querySelector(".neighbour-note").textContent = "This server has no index, so there is nothing to search.";
      card.querySelector(".neighbours-block").hidden = false;
    }
    card.dataset.state = "done";
    page.recent.push(embedding.l0);
    if (page.recent.length > RECENT_MAX) page.recent.shift();
  } catch (err) {
    if (!(err instanceof ApiError)) err = new ApiError(-1, "page", err.message || String(err));
    fail(card, err);
  }
}

async function handleFiles(fileList) {
  const files = [...(fileList || [])];
  if (!files.length) return;
  $("page-error").hidden = true;
  if (!page.info) await loadInfo();
  const cards = files.map((f) => [newCard(f), f]);
  $("results").prepend(...cards.map(([card]) => card)); // this batch on top, in the order chosen
  page.pending += files.length;
  document.body.dataset.state = "busy";
  $("live").textContent = `Searching ${files.length} image${files.length > 1 ? "s" : ""}\u2026`;
  for (const [card, file] of cards) {
    await processFile(card, file); // one at a time: the server batches concurrent users, not one page's files
    page.pending -= 1;
  }
  document.body.dataset.state = page.pending ? "busy" : "done";
  const failed = cards.filter(([card]) => card.dataset.state === "error").length;
  $("live").textContent = `${files.length} image${files.length > 1 ? "s" : ""} searched` +
    (failed ? `, ${failed} failed` : "") + "; results below.";
  await loadDrift();
}

// ------------------------------------------------------------------------------------------ wiring
$("file").addEventListener("change", (e) => {
  handleFiles(e.target.files);
  e.target.value = ""; // choosing the same file again searches again
});
$("api-key").value = localStorage.getItem("lpjepa-api-key") || "";
$("api-key").addEventListener("change", (e) => {
  localStorage.setItem("lpjepa-api-key", e.target.value.trim());
  loadInfo();
});
$("clear").addEventListener("click", () => {
  $("results").replaceChildren();
  document.body.dataset.state = "idle";
});
const drop = $("drop");
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  handleFiles(e.dataTransfer.files);
});
loadInfo();
