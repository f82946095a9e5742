// The demo page: upload -> POST /v1/embed (sparse code + OOD) -> POST /v1/search with that code (neighbours).
"use strict";

const $ = (id) => document.getElementById(id);

function authHeaders() {
  const key = $("api-key").value.trim() || localStorage.getItem("lpjepa-api-key") || "";
  return key ? { Authorization: "Bearer " + key } : {};
}

async function call(path, options) {
  const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : "HTTP " + response.status;
    const err = new Error(message);
    err.status = response.status;
    err.code = body && body.error ? body.error.code : "";
    throw err;
  }
  return body;
}

function setState(state) { document.body.dataset.state = state; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  setState("error");
}

async function loadInfo() {
  try {
    const info = await call("/v1/info", {});
    const index = info.index ? `${info.index.size} items indexed` : "no index";
    const ood = info.ood_calibrated ? "OOD calibrated" : "no OOD calibration";
    $("model-info").textContent = `${info.dim} dimensions \u00b7 ${index} \u00b7 ${ood}`;
  } catch (err) {
    $("model-info").textContent = "model info unavailable: " + err.message;
  }
}

function drawCode(embedding) {
  const svg = $("code-chart");
  const dim = embedding.dim;
  const max = Math.max(1e-12, ...embedding.values);
  const values = new Map(embedding.indices.map((d, i) => [d, embedding.values[i]]));
  svg.setAttribute("viewBox", `0 0 ${dim} 100`);
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  for (let d = 0; d < dim; d++) {
    const v = values.get(d) || 0;
    const rect = document.createElementNS(ns, "rect");
    const h = v > 0 ? Math.max(2, (98 * v) / max) : 1;
    rect.setAttribute("x", d + 0.1);
    rect.setAttribute("width", 0.8);
    rect.setAttribute("y", 100 - h);
    rect.setAttribute("height", h);
    rect.setAttribute("class", v > 0 ? "on" : "off");
    rect.dataset.dim = d;
    const title = document.createElementNS(ns, "title");
    title.textContent = `dim ${d}: ${v.toFixed(4)}`;
    rect.appendChild(title);
    svg.appendChild(rect);
  }
  const top = embedding.indices.map((d, i) => [d, embedding.values[i]]).sort((a, b) => b[1] - a[1]).slice(0, 24);
  $("active-dims").replaceChildren(...top.map(([d, v]) => {
    const li = document.createElement("li");
    li.textContent = `dim ${d}: ${v.toFixed(3)}`;
    return li;
  }));
  $("summary").textContent =
    `${embedding.nnz} of ${dim} dimensions fire (l0 = ${(100 * embedding.l0).toFixed(1)}%)`;
  const ood = $("ood");
  if (embedding.ood_score === null || embedding.ood_score === undefined) {
    ood.textContent = "OOD score: n/a (model not calibrated)";
    ood.className = "badge";
  } else {
    ood.textContent = `OOD score ${embedding.ood_score.toFixed(3)}: ` +
      (embedding.is_ood ? "out of distribution" : "in distribution");
    ood.className = "badge " + (embedding.is_ood ? "ood" : "in");
  }
  $("code-panel").hidden = false;
}

function drawNeighbours(results) {
  const grid = $("neighbours");
  grid.replaceChildren(...results.map((hit) => {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.id = hit.id;
    if (hit.thumbnail) {
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + hit.thumbnail;
      img.alt = "item " + hit.id;
      card.appendChild(img);
    } else {
      const box = document.createElement("div");
      box.className = "noimg";
      box.textContent = "no image";
      card.appendChild(box);
    }
    const caption = document.createElement("figcaption");
    const p = hit.payload && typeof hit.payload === "object" ? hit.payload : {};
    const label = p.class ?? p.label ?? p.name ?? p.title ?? (typeof hit.payload === "string" ? hit.payload : undefined);
    caption.textContent = `#${hit.id} \u00b7 ${hit.score.toFixed(3)}` + (label !== undefined ? ` \u00b7 ${label}` : "");
    card.appendChild(caption);
    return card;
  }));
  $("neighbour-note").textContent = results.length ? `${results.length} nearest, best first` : "the index is empty";
  $("neighbour-panel").hidden = false;
}

async function handleFile(file) {
  if (!file) return;
  $("error").hidden = true;
  setState("loading");
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  try {
    const form = new FormData();
    form.append("files", file, file.name);
    const embedded = await call("/v1/embed", { method: "POST", body: form });
    const embedding = embedded.embeddings[0];
    drawCode(embedding);
    try {
      const k = Math.max(1, Math.min(50, parseInt($("k").value, 10) || 8));
      const found = await call("/v1/search", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ embedding: { indices: embedding.indices, values: embedding.values }, k, thumbnails: true }),
      });
      drawNeighbours(found.results);
    } catch (err) {
      if (err.code !== "no_index") throw err;
      $("neighbour-note").textContent = "this server has no index (start it with --index)";
      $("neighbours").replaceChildren();
      $("neighbour-panel").hidden = false;
    }
    setState("done");
  } catch (err) {
    showError(err.message);
  }
}

$("file").addEventListener("change", (e) => handleFile(e.target.files[0]));
$("api-key").addEventListener("change", (e) => localStorage.setItem("lpjepa-api-key", e.target.value.trim()));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  handleFile(e.dataTransfer.files[0]);
});
loadInfo();
