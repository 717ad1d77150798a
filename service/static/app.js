// The monosemantic feature browser: hash routes (#/, #/feature/N, #/inspect, #/steer) over the REST API.
"use strict";

const $ = (selector) => document.querySelector(selector);
const views = ["search", "feature", "inspect", "steer"];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

// An API key, when the server has keys: typed into the header's field and kept in this tab's session storage
// (never in a URL, never in local storage), sent as "Authorization: Bearer KEY" on every call.
const KEY_STORAGE = "monosemantic-api-key";

function headers() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return { "content-type": "application/json", ...(key ? { authorization: `Bearer ${key}` } : {}) };
}

function refusal(response, body) {
  if (response.status === 401) {
    $("#key-form").classList.add("needed");
    return new Error("This server needs an API key: enter one above. " + ((body.error && body.error.message) || ""));
  }
  return new Error((body.error && body.error.message) || `HTTP ${response.status}`);
}

async function api(path, options = {}) {
  const response = await fetch(path, { headers: headers(), ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw refusal(response, body);
  return body;
}

// Shade a token by its activation relative to a maximum (the feature's own max, as in Bricken et al.'s pages).
function shade(value, max) {
  const alpha = max > 0 ? Math.min(1, Math.max(0, value / max)) : 0;
  return `rgba(var(--hot), ${alpha.toFixed(3)})`;
}

function visible(text) {
  return text.replace(/\n/g, "⏎\n");
}

function tokenSpans(tokens, activations, max, centre) {
  return tokens.map((text, i) => {
    const span = el("span", { class: "tok" + (i === centre ? " centre" : ""), title: activations[i].toFixed(3) }, visible(text));
    span.style.background = shade(activations[i], max);
    return span;
  });
}

function featureLink(feature, label) {
  return el("span", { class: "feature-link", onclick: () => { location.hash = `#/feature/${feature}`; } },
    `#${feature}` + (label ? ` ${label}` : ""));
}

// ---- search ------------------------------------------------------------------------------------------------
async function runSearch(q, by, page = 1) {
  const status = $("#search-status");
  status.textContent = "searching…";
  const params = new URLSearchParams({ q, by, page, page_size: 20 });
  const result = await api(`/v1/features/search?${params}`);
  const body = $("#search-results tbody");
  body.replaceChildren(...result.results.map((hit) => el("tr", { "data-feature": hit.feature, onclick: () => { location.hash = `#/feature/${hit.feature}`; } },
    el("td", {}, `#${hit.feature}`), el("td", {}, hit.label), el("td", {}, hit.score.toFixed(3)),
    el("td", {}, hit.density.toExponential(2)), el("td", {}, hit.max_activation.toFixed(2)))));
  $("#search-results").hidden = result.results.length === 0;
  status.textContent = `${result.total} features ${by === "token" ? "involve this token" : "fire on this snippet"}`;
  const pages = Math.ceil(result.total / result.page_size);
  $("#search-pages").replaceChildren(...(pages > 1 ? [
    el("button", { type: "button", onclick: () => runSearch(q, by, page - 1).catch((e) => showError(e.message)), ...(page <= 1 ? { disabled: "" } : {}) }, "‹ previous"),
    el("span", { class: "muted" }, `page ${page} of ${pages}`),
    el("button", { type: "button", onclick: () => runSearch(q, by, page + 1).catch((e) => showError(e.message)), ...(page >= pages ? { disabled: "" } : {}) }, "next ›"),
  ] : []));
}

// ---- one feature ---------------------------------------------------------------------------------------------
// Bars of log counts over log10 bins; `power` labels the axis with 10^edge (activations) or the edge itself.
function drawHistogram(svg, histogram, power = true) {
  const counts = histogram.counts, edges = histogram.log10_edges;
  const logs = counts.map((c) => (c > 0 ? Math.log10(c + 1) : 0));
  const top = Math.max(1e-9, ...logs);
  const width = 380 / Math.max(1, counts.length);
  const bars = logs.map((v, i) => {
    const h = (v / top) * 110;
    const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    bar.setAttribute("x", 10 + i * width); bar.setAttribute("y", 120 - h);
    bar.setAttribute("width", Math.max(1, width - 1)); bar.setAttribute("height", h);
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    const axis = (e) => (power ? Math.pow(10, e).toPrecision(2) : String(e));
    title.textContent = `${axis(edges[i])}–${axis(edges[i + 1])}: ${counts[i]}`;
    bar.append(title);
    return bar;
  });
  const labels = [0, Math.floor(counts.length / 2), counts.length].map((i, n) => {
    const text = document.createElementNS("http://www.w3.org/2000/svg", "text");
    text.setAttribute("x", 10 + i * width); text.setAttribute("y", 134);
    text.setAttribute("text-anchor", ["start", "middle", "end"][n]);
    text.textContent = power ? Math.pow(10, edges[i]).toPrecision(2) : String(edges[i]);
    return text;
  });
  svg.replaceChildren(...bars, ...labels);
}

function examples(container, list, max) {
  container.replaceChildren(...(list.length ? list.map((ex) => el("div", { class: "example" },
    el("span", { class: "value" }, ex.value.toFixed(2) + (ex.quantile !== null && ex.quantile !== undefined ? ` q${ex.quantile}` : "")),
    ...tokenSpans(ex.tokens, ex.activations, max, ex.centre))) : [el("p", { class: "muted" }, "no examples")]));
}

async function showFeature(id) {
  const f = await api(`/v1/features/${id}`);
  $("#feature-title").replaceChildren(`Feature #${f.feature} `, el("span", { class: "muted" }, f.label));
  $("#feature-summary").textContent =
    `fires on ${(100 * f.density).toPrecision(3)}% of ${f.statistics_tokens.toLocaleString()} tokens · mean ${f.mean_activation.toFixed(2)} · max ${f.max_activation.toFixed(2)} · dictionary ${f.dictionary.name} v${f.dictionary.version}`;
  drawHistogram($("#feature-histogram"), f.histogram);
  $("#logit-up").replaceChildren(...f.logit_up.map((l) => el("li", {}, `${JSON.stringify(l.token)} ${l.value.toFixed(2)}`)));
  $("#logit-down").replaceChildren(...f.logit_down.map((l) => el("li", {}, `${JSON.stringify(l.token)} ${l.value.toFixed(2)}`)));
  $("#neighbours").replaceChildren(...f.neighbours.map((n) => el("li", {}, featureLink(n.feature, n.label), ` cos ${n.cosine.toFixed(2)}`)));
  examples($("#top-examples"), f.top_examples, f.max_activation);
  examples($("#quantile-examples"), f.quantile_examples, f.max_activation);
}

// ---- inspect a text --------------------------------------------------------------------------------------------
let inspected = null;

async function inspect(text) {
  inspected = await api("/v1/activations", { method: "POST", body: JSON.stringify({ text, top_k: 5 }) });
  inspected.text = text;
  renderInspected(null, null);
}

function renderInspected(selectedToken, feature) {
  const tokens = inspected.tokens.slice(1);  // the BOS token is not part of the text
  const max = feature ? Math.max(1e-9, ...feature.values) : 0;
  $("#inspect-tokens").replaceChildren(...tokens.map((t, i) => {
    const span = el("span", { class: "tok" + (i === selectedToken ? " selected" : ""), "data-index": i,
      onclick: () => renderInspected(i, null) }, visible(inspected.text.slice(t.start, t.end)));
    if (feature) span.style.background = shade(feature.values[i], max);
    return span;
  }));
  const detail = $("#inspect-detail");
  if (selectedToken === null && !feature) { detail.replaceChildren(el("p", { class: "muted" }, "click a token to see its features")); return; }
  if (feature) { detail.replaceChildren(el("p", {}, "highlighting ", featureLink(feature.id, ""), ` over the text (max ${max.toFixed(2)})`)); return; }
  const token = tokens[selectedToken];
  detail.replaceChildren(el("p", {}, `token ${JSON.stringify(token.text)} · L0 ${token.l0} · reconstruction error ${token.recon_error.toFixed(3)}`),
    el("ul", {}, ...token.top.map((f) => el("li", {},
      el("button", { type: "button", class: "highlight", "data-feature": f.feature, onclick: () => highlight(f.feature) }, `#${f.feature}`),
      ` ${f.value.toFixed(2)} `, featureLink(f.feature, "")))));
}

async function highlight(feature) {
  const result = await api("/v1/activations", { method: "POST", body: JSON.stringify({ text: inspected.text, top_k: 0, feature_ids: [feature] }) });
  renderInspected(null, { id: feature, values: result.tokens.slice(1).map((t) => t.values[0]) });
}

// ---- steer -------------------------------------------------------------------------------------------------------
function addSteerRow(feature = "", mode = "clamp", value = "10") {
  const row = el("div", { class: "steer-row" },
    el("input", { type: "number", min: "0", placeholder: "feature #", class: "steer-feature", value: feature }),
    (() => { const s = el("select", { class: "steer-mode" }, el("option", { value: "clamp" }, "clamp"), el("option", { value: "add" }, "add")); s.value = mode; return s; })(),
    el("input", { type: "number", step: "0.5", class: "steer-value", value }),
    el("button", { type: "button", onclick: () => row.remove() }, "×"));
  $("#steer-rows").append(row);
}

// POST /v1/generate with stream: true, reading server-sent events (`token` … `done`) as they arrive.
async function stream(body, output) {
  output.textContent = "";
  const response = await fetch("/v1/generate", { method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }) });
  if (!response.ok) throw refusal(response, await response.json().catch(() => ({})));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", done = null;
  for (;;) {
    const { value, done: finished } = await reader.read();
    if (finished) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const name = (block.match(/^event: (.*)$/m) || [])[1];
      const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "{}");
      if (name === "token") output.textContent += data.text;
      else if (name === "done") done = data;
      else if (name === "error") throw new Error(data.error.message);
    }
  }
  return done;
}

async function steer() {
  const steering = [...document.querySelectorAll("#steer-rows .steer-row")]
    .filter((row) => row.querySelector(".steer-feature").value !== "")
    .map((row) => ({ feature: Number(row.querySelector(".steer-feature").value), mode: row.querySelector(".steer-mode").value,
      value: Number(row.querySelector(".steer-value").value) }));
  const body = { prompt: $("#steer-prompt").value, max_new_tokens: Number($("#steer-tokens").value),
    temperature: Number($("#steer-temperature").value), seed: Number($("#steer-seed").value) };
  $("#steer-status").textContent = "generating…";
  const [steered, plain] = await Promise.all([stream({ ...body, steering }, $("#steer-steered")), stream(body, $("#steer-plain"))]);
  $("#steer-status").textContent = `steered: ${steered.finish_reason}, unsteered: ${plain.finish_reason} · seed ${steered.seed}`;
}

// ---- routing --------------------------------------------------------------------------------------------------------
function show(view) {
  for (const name of views) $(`#view-${name}`).hidden = name !== view;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
}

async function route() {
  showError("");
  const hash = location.hash || "#/";
  const feature = hash.match(/^#\/feature\/(\d+)$/);
  try {
    if (feature) { show("feature"); await showFeature(Number(feature[1])); }
    else if (hash === "#/inspect") show("inspect");
    else if (hash === "#/steer") show("steer");
    else show("search");
  } catch (error) { showError(error.message); }
}

function guard(fn) {
  return (event) => { event.preventDefault(); showError(""); fn().catch((error) => showError(error.message)); };
}

// What an evaluation was measured on, in words: the user's dataset (and its split), an activation file, or the
// built-in corpus; the fingerprint in the tooltip.
function describeData(data) {
  if (!data || !data.kind) return "held-out training data";
  if (data.kind === "dataset") return `${data.dataset}${data.split ? ` (${data.split})` : ""}`;
  if (data.kind === "activation-file") return `activations ${data.path}`;
  return "built-in corpus";
}

function showEvaluations(serving) {
  const cell = (value, digits) => (value === undefined || value === null ? "–" : Number(value).toFixed(digits));
  const rows = [{ recorded: "at publishing", data: null, metrics: serving.metrics || {} }, ...serving.evaluations];
  const body = $("#evaluations tbody");
  body.replaceChildren(...rows.map((e) => {
    const on = el("td", {}, describeData(e.data));
    if (e.data && e.data.fingerprint) on.title = `fingerprint ${e.data.fingerprint}`;
    return el("tr", {}, el("td", {}, e.recorded), on, el("td", {}, cell(e.metrics.tokens, 0)), el("td", {}, cell(e.metrics.l0, 1)),
      el("td", {}, cell(e.metrics.fvu, 3)), el("td", {}, cell(e.metrics.loss_recovered, 3)), el("td", {}, cell(e.metrics.dead_fraction, 3)));
  }));
}

$("#search-form").addEventListener("submit", guard(() => runSearch($("#search-q").value, $("#search-by").value)));
$("#goto-feature").addEventListener("change", (e) => { if (e.target.value !== "") location.hash = `#/feature/${e.target.value}`; });
$("#inspect-form").addEventListener("submit", guard(() => inspect($("#inspect-text").value)));
$("#steer-form").addEventListener("submit", guard(steer));
$("#steer-add").addEventListener("click", () => addSteerRow());
$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
  $("#api-key").value = "";
  location.reload();  // every view again, with the key
});
$("#key-state").textContent = sessionStorage.getItem(KEY_STORAGE) ? "key set" : "";
window.addEventListener("hashchange", route);
addSteerRow();
api("/v1/dictionaries").then((d) => {
  const serving = d.dictionaries[0];
  $("#dictionary").textContent = `${serving.name} v${serving.version} · ${serving.architecture} ${serving.d_in}→${serving.d_sae} · ${serving.hook}`;
  const density = serving.metrics && serving.metrics.density_histogram;
  if (density) {
    drawHistogram($("#density-histogram"), density, false);
    $("#density-note").textContent = `${density.dead} dead features (never fired) not shown · L0 ${Number(serving.metrics.l0).toFixed(1)} · FVU ${Number(serving.metrics.fvu).toFixed(3)}`;
  } else $("#density-histogram").hidden = true;
  showEvaluations(serving);
  if (serving.source && serving.source.format) {  // an imported dictionary says where it came from
    const s = serving.source;
    $("#source").textContent = `Imported from ${s.format}: ${s.location}${s.revision ? ` @ ${s.revision}` : ""}` +
      (s.folded && s.folded.length ? ` (folded into the weights: ${s.folded.join(", ")})` : "");
    $("#source").hidden = false;
  }
}).catch((error) => showError(error.message));
route();
