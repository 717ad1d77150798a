// The monosemantic feature browser: hash routes (#/search?q=…&dictionary=…, #/feature/N?dictionary=…, #/inspect, #/steer) over the REST API.
"use strict";

const $ = (selector) => document.querySelector(selector);
const views = ["search", "feature", "inspect", "steer"];
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.setAttribute("class", value);
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
  const error = new Error((body.error && body.error.message) || `HTTP ${response.status}`);
  error.status = response.status;
  return error;
}

async function api(path, options = {}) {
  const response = await fetch(path, { headers: headers(), ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw refusal(response, body);
  return body;
}

const post = (path, body) => api(path, { method: "POST", body: JSON.stringify(body) });
const query = (params) => new URLSearchParams(params).toString();

// ---- the URL: #/PATH?PARAMS holds the view, the dictionary and the search, so a link restores them ---------------
let loaded = [];  // GET /v1/dictionaries: the loaded dictionaries, the default first

function here() {
  const hash = location.hash.replace(/^#\/?/, "");
  const cut = hash.indexOf("?");
  return { path: cut < 0 ? hash : hash.slice(0, cut), params: new URLSearchParams(cut < 0 ? "" : hash.slice(cut + 1)) };
}

// The dictionary every request names: the URL's, else the server's default.
function current() {
  return here().params.get("dictionary") || (loaded[0] ? loaded[0].name : "");
}

const nameOf = (reference) => reference.split(":")[0];
const infoOf = (reference) => loaded.find((d) => d.name === nameOf(reference));

function href(path, params = {}) {
  const kept = Object.entries({ dictionary: current(), ...params }).filter(([, v]) => v !== undefined && v !== null && v !== "");
  return `#/${path}?${query(kept)}`;
}

function go(path, params) { location.hash = href(path, params); }

// The same view with some parameters changed ("" drops one).
function update(changes, path = here().path) {
  go(path, { ...Object.fromEntries(here().params), ...changes });
}

// ---- small pieces --------------------------------------------------------------------------------------------------
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

// A feature's best-scoring explanation where `monosemantic-train explain` made one; else its heuristic label (from
// its top tokens), marked as such.
function described(item) {
  if (item.explanation) return el("span", { class: "explanation" }, item.explanation);
  return el("span", { class: "muted heuristic", title: "a label made from the feature's top tokens: it has no explanation yet" },
    item.label ? `${item.label} (label from top tokens)` : "");
}

function scoreText(score) {
  return score === null || score === undefined ? "unscored" : `score ${score.toFixed(2)}`;
}

function featureLink(feature, label, dictionary = current()) {
  return el("a", { class: "feature-link", href: href(`feature/${feature}`, { dictionary }) }, `#${feature}` + (label ? ` ${label}` : ""));
}

// ‹ previous · page N of M · next ›, each button calling turn(page).
function pager(container, page, pages, turn) {
  const button = (to, text, off) => el("button", { type: "button", onclick: () => turn(to), ...(off ? { disabled: "" } : {}) }, text);
  container.replaceChildren(...(pages > 1 ? [button(page - 1, "‹ previous", page <= 1), el("span", { class: "muted" }, `page ${page} of ${pages}`),
    button(page + 1, "next ›", page >= pages)] : []));
}

// Bars of log counts over log10 bins, with both axes labelled; `power` writes the x ticks as 10^edge (activations)
// rather than the edge itself (log10 densities).
function drawHistogram(svg, histogram, { x, y, power }) {
  const counts = histogram.counts, edges = histogram.log10_edges;
  const left = 40, right = 392, top = 8, bottom = 128;
  const logs = counts.map((c) => Math.log10(c + 1));
  const highest = Math.max(1e-9, ...logs);
  const width = (right - left) / Math.max(1, counts.length);
  const tick = (e) => (power ? Math.pow(10, e).toPrecision(2) : String(Number(e.toFixed(2))));
  const bars = logs.map((v, i) => {
    const h = (v / highest) * (bottom - top);
    return el("svg:rect", { x: left + i * width, y: bottom - h, width: Math.max(1, width - 1), height: h },
      el("svg:title", {}, `${tick(edges[i])}–${tick(edges[i + 1])}: ${counts[i]}`));
  });
  const xTicks = [0, Math.floor(counts.length / 2), counts.length].map((i, n) =>
    el("svg:text", { x: left + i * width, y: bottom + 12, "text-anchor": ["start", "middle", "end"][n] }, tick(edges[i])));
  const yTicks = [[bottom, "0"], [top + 8, String(Math.max(0, ...counts))]].map(([at, text]) =>
    el("svg:text", { x: left - 4, y: at, "text-anchor": "end" }, text));
  svg.replaceChildren(...bars, ...xTicks, ...yTicks,
    el("svg:path", { class: "axis", d: `M${left},${top} V${bottom} H${right}` }),
    el("svg:text", { class: "axis-label x", x: (left + right) / 2, y: bottom + 30, "text-anchor": "middle" }, x),
    el("svg:text", { class: "axis-label y", transform: `translate(10 ${(top + bottom) / 2}) rotate(-90)`, "text-anchor": "middle" }, y));
}

// ---- the start page: search, the dictionary's features, its density and evaluations -------------------------------
async function runSearch(q, by, page) {
  const status = $("#search-status");
  status.textContent = "searching…";
  const asked = location.hash;
  const result = await api(`/v1/features/search?${query({ q, by, page, page_size: 20, dictionary: current() })}`);
  if (location.hash !== asked) return;  // the view moved on while this was on its way
  $("#search-results tbody").replaceChildren(...result.results.map((hit) => el("tr", { "data-feature": hit.feature, onclick: () => go(`feature/${hit.feature}`) },
    el("td", {}, `#${hit.feature}`), el("td", {}, described(hit)), el("td", {}, hit.score.toFixed(3)),
    el("td", {}, hit.density.toExponential(2)), el("td", {}, hit.max_activation.toFixed(2)))));
  $("#search-results").hidden = result.results.length === 0;
  const what = { token: "involve this token", explanation: "have an explanation with these words (best-scoring first)" }[by] || "fire on this snippet";
  status.textContent = `${result.total} features of ${result.dictionary.name} ${what}`;
  pager($("#search-pages"), page, Math.ceil(result.total / result.page_size), (to) => update({ page: to }));
}

function clearSearch() {
  $("#search-status").textContent = "";
  $("#search-results").hidden = true;
  $("#search-pages").replaceChildren();
}

// A Matryoshka dictionary's prefixes: each leading block of features is itself a dictionary (its widths from the
// service); "" is the whole dictionary.
function showPrefixes(info, prefix) {
  const widths = (info && info.matryoshka_widths) || [];
  const select = $("#list-prefix");
  select.hidden = widths.length < 2;
  select.replaceChildren(el("option", { value: "" }, "all features"),
    ...widths.slice(0, -1).map((w) => el("option", { value: String(w) }, `first ${w} (a prefix)`)));
  select.value = widths.slice(0, -1).includes(Number(prefix)) ? prefix : "";
  return select.value;
}

async function listFeatures(order, page, prefix = "") {
  const rows = $("#feature-list tbody");
  const info = loaded.find((d) => d.name === nameOf(current()));
  if (info && !info.statistics) {  // nothing to list: say how to compute them, without asking for a 409
    rows.replaceChildren();
    $("#list-pages").replaceChildren();
    $("#list-status").textContent = `dictionary ${info.name} v${info.version} has no feature statistics; compute them with ` +
      `\`monosemantic-train features --registry REGISTRY --dictionary ${info.name}:${info.version}\` and load the new version`;
    return;
  }
  try {
    const asked = location.hash;
    const result = await api(`/v1/features?${query({ dictionary: current(), order, page, page_size: 20, ...(prefix ? { below: prefix } : {}) })}`);
    if (location.hash !== asked) return;
    rows.replaceChildren(...result.results.map((f) => el("tr", { "data-feature": f.feature, "data-density": f.density, onclick: () => go(`feature/${f.feature}`) },
      el("td", {}, `#${f.feature}`), el("td", {}, described(f)), el("td", {}, f.density.toExponential(2)), el("td", {}, f.max_activation.toFixed(2)))));
    $("#list-status").textContent = `${result.total} features${prefix ? ` of the first ${prefix}` : ""}`;
    pager($("#list-pages"), page, Math.ceil(result.total / result.page_size), (to) => update({ list_page: to }));
  } catch (error) {
    if (error.status !== 409) throw error;
    rows.replaceChildren();  // no feature statistics: the service's message says how to compute them
    $("#list-pages").replaceChildren();
    $("#list-status").textContent = error.message;
  }
}

// What an evaluation was measured on, in words: the user's dataset (and its split), an activation file, or the
// built-in corpus; the fingerprint in the tooltip.
function describeData(data) {
  if (!data || !data.kind) return "held-out training data";
  if (data.kind === "dataset") return `${data.dataset}${data.split ? ` (${data.split})` : ""}`;
  if (data.kind === "activation-file") return `activations ${data.path}`;
  return "built-in corpus";
}

function showDictionary(info) {
  const density = info && info.metrics && info.metrics.density_histogram;
  $("#density-histogram").hidden = !density;
  $("#density-note").textContent = "";
  if (density) {
    drawHistogram($("#density-histogram"), density, { x: "feature density (log10 share of tokens)", y: "features (log count)", power: false });
    $("#density-note").textContent = `${density.dead} dead features (never fired) not shown · L0 ${Number(info.metrics.l0).toFixed(1)} · FVU ${Number(info.metrics.fvu).toFixed(3)}`;
  }
  const cell = (value, digits) => (value === undefined || value === null ? "–" : Number(value).toFixed(digits));
  const rows = info ? [{ recorded: "at publishing", data: null, metrics: info.metrics || {} }, ...info.evaluations] : [];
  $("#evaluations tbody").replaceChildren(...rows.map((e) => {
    const on = el("td", {}, describeData(e.data));
    if (e.data && e.data.fingerprint) on.title = `fingerprint ${e.data.fingerprint}`;
    return el("tr", {}, el("td", {}, e.recorded), on, el("td", {}, cell(e.metrics.tokens, 0)), el("td", {}, cell(e.metrics.l0, 1)),
      el("td", {}, cell(e.metrics.fvu, 3)), el("td", {}, cell(e.metrics.loss_recovered, 3)), el("td", {}, cell(e.metrics.dead_fraction, 3)));
  }));
  const s = info && info.source;
  $("#source").hidden = !(s && s.format);
  if (s && s.format) {  // an imported dictionary says where it came from
    $("#source").textContent = `Imported from ${s.format}: ${s.location}${s.revision ? ` @ ${s.revision}` : ""}` +
      (s.folded && s.folded.length ? ` (folded into the weights: ${s.folded.join(", ")})` : "");
  }
}

async function showStart(params) {
  showDictionary(infoOf(current()));
  const q = params.get("q") || "", by = params.get("by") || "snippet", order = params.get("order") || "density";
  $("#search-q").value = q;
  $("#search-by").value = by;
  $("#list-order").value = order;
  const prefix = showPrefixes(infoOf(current()), params.get("prefix") || "");
  await Promise.all([listFeatures(order, Number(params.get("list_page")) || 1, prefix),
    q ? runSearch(q, by, Number(params.get("page")) || 1) : clearSearch()]);
}

async function randomFeature() {
  const result = await api(`/v1/features?${query({ dictionary: current(), order: "random", page_size: 1 })}`);
  if (!result.results.length) throw new Error(`${result.dictionary.name} has no live features`);
  go(`feature/${result.results[0].feature}`);
}

// ---- one feature ---------------------------------------------------------------------------------------------------
function examples(container, list, max) {
  container.replaceChildren(...(list.length ? list.map((ex) => el("div", { class: "example" },
    el("span", { class: "value" }, ex.value.toFixed(2) + (ex.quantile !== null && ex.quantile !== undefined ? ` q${ex.quantile}` : "")),
    ...tokenSpans(ex.tokens, ex.activations, max, ex.centre))) : [el("p", { class: "muted" }, "no examples")]));
}

async function showFeature(id) {
  $("#feature-title").replaceChildren();
  $("#feature-summary").textContent = "";
  const asked = location.hash;
  const f = await api(`/v1/features/${id}?${query({ dictionary: current() })}`);
  if (location.hash !== asked) return;
  const best = f.explanations[0];
  $("#feature-title").replaceChildren(`Feature #${f.feature} `, described({ explanation: best && best.explanation, label: f.label }));
  $("#explanations").replaceChildren(...f.explanations.map((e) => el("li", { "data-run": e.run },
    el("span", { class: "explanation" }, e.explanation), ` — ${scoreText(e.score)}`,
    el("span", { class: "muted" }, ` (detection ${e.detection && e.detection.balanced_accuracy !== null ? e.detection.balanced_accuracy.toFixed(2) : "–"}, ` +
      `fuzzing ${e.fuzzing && e.fuzzing.balanced_accuracy !== null ? e.fuzzing.balanced_accuracy.toFixed(2) : "–"}, ` +
      `simulation r ${e.simulation && e.simulation.correlation !== null ? e.simulation.correlation.toFixed(2) : "–"}; ` +
      `${e.explainer_model} explained, ${e.scorer_model} scored, ${e.prompt_version})`))));
  $("#feature-summary").textContent =
    `fires on ${(100 * f.density).toPrecision(3)}% of ${f.statistics_tokens.toLocaleString()} tokens · mean ${f.mean_activation.toFixed(2)} · max ${f.max_activation.toFixed(2)} · dictionary ${f.dictionary.name} v${f.dictionary.version}`;
  // A clamp at twice the feature's largest activation seen: strong, in its own units.
  $("#steer-this").href = href("steer", { dictionary: f.dictionary.name, feature: f.feature, value: Math.max(1, 2 * f.max_activation).toFixed(1) });
  $("#steer-this").textContent = "steer this feature →";
  drawHistogram($("#feature-histogram"), f.histogram, { x: "activation (log10 bins)", y: "tokens (log count)", power: true });
  $("#logit-up").replaceChildren(...f.logit_up.map((l) => el("li", {}, `${JSON.stringify(l.token)} ${l.value.toFixed(2)}`)));
  $("#logit-down").replaceChildren(...f.logit_down.map((l) => el("li", {}, `${JSON.stringify(l.token)} ${l.value.toFixed(2)}`)));
  $("#neighbours").replaceChildren(...f.neighbours.map((n) => el("li", {}, featureLink(n.feature, n.label), ` cos ${n.cosine.toFixed(2)}`)));
  $("#counterparts").replaceChildren(...(f.counterparts.length ? f.counterparts.map((c) => el("li", { "data-dictionary": c.dictionary, "data-feature": c.feature },
    `${c.dictionary} `, featureLink(c.feature, c.label, nameOf(c.dictionary)), ` cos ${c.cosine.toFixed(2)}`)) : [el("li", { class: "muted" }, "no other loaded dictionary at this hook")]));
  shownFeature = f;
  $("#steer-eval-status").textContent = "";
  $("#steer-eval-chart").hidden = true;
  $("#steer-eval-best").replaceChildren();
  examples($("#top-examples"), f.top_examples, f.max_activation);
  examples($("#quantile-examples"), f.quantile_examples, f.max_activation);
}

// ---- a feature's steering curves (POST /v1/steer-eval, cached by the server per dictionary version) ---------------
let shownFeature = null;
const METHOD_NAMES = { clamp: "clamp", add: "add", mean_difference: "mean difference (baseline)" };

function drawCurves(svg, result) {
  const left = 40, right = 392, top = 8, bottom = 128, effect = result.effect;
  const points = result.curves.flatMap((c) => c.points).filter((p) => p.kl !== null && p[effect] !== null);
  const maxKl = Math.max(1e-6, ...points.map((p) => p.kl)), maxEffect = Math.max(1e-9, ...points.map((p) => p[effect]));
  const x = (kl) => left + (kl / maxKl) * (right - left), y = (v) => bottom - (v / maxEffect) * (bottom - top);
  const lines = result.curves.map((c) => el("svg:polyline", { class: `curve ${c.method}`, "data-method": c.method, fill: "none",
    points: c.points.filter((p) => p.kl !== null && p[effect] !== null).map((p) => `${x(p.kl).toFixed(1)},${y(p[effect]).toFixed(1)}`).join(" ") },
    el("svg:title", {}, METHOD_NAMES[c.method])));
  const budgets = result.winners.map((w) => el("svg:line", { class: "budget", x1: x(w.budget), x2: x(w.budget), y1: top, y2: bottom }));
  svg.replaceChildren(...budgets, ...lines,
    el("svg:path", { class: "axis", d: `M${left},${top} V${bottom} H${right}` }),
    el("svg:text", { x: left, y: bottom + 12, "text-anchor": "start" }, "0"),
    el("svg:text", { x: right, y: bottom + 12, "text-anchor": "end" }, maxKl.toPrecision(2)),
    el("svg:text", { x: left - 4, y: top + 8, "text-anchor": "end" }, maxEffect.toPrecision(2)),
    el("svg:text", { class: "axis-label x", x: (left + right) / 2, y: bottom + 30, "text-anchor": "middle" }, "KL from the unsteered model"),
    el("svg:text", { class: "axis-label y", transform: `translate(10 ${(top + bottom) / 2}) rotate(-90)`, "text-anchor": "middle" }, effect));
  svg.hidden = false;
}

async function measureSteering() {
  const f = shownFeature;
  if (!f) return;
  const effect = $("#steer-eval-effect").value;
  $("#steer-eval-status").textContent = "measuring… (the first time a few seconds; then cached)";
  const result = await post("/v1/steer-eval", { dictionary: f.dictionary.name, feature: f.feature, effect, new_tokens: 12, prompts: 4 });
  if (shownFeature !== f) return;
  drawCurves($("#steer-eval-chart"), result);
  const tokens = result.promoted.slice(0, 5).map((t) => JSON.stringify(t.token)).join(" ");
  $("#steer-eval-status").textContent = `scale ×1 = ${result.scale.toFixed(2)} (its max activation) · promoted tokens ${tokens} · ` +
    `unsteered ${effect} ${result.unsteered[effect].toFixed(4)} · on ${result.text === "given" ? "the given text" : "the model's own samples"}`;
  $("#steer-eval-best").replaceChildren(...result.winners.map((w) => {
    const best = result.best.filter((b) => b.budget === w.budget && b.point);
    const cells = best.map((b) => `${METHOD_NAMES[b.method]} ×${b.point.multiple} (${b.point[effect].toFixed(4)})`).join(", ");
    return el("li", { "data-budget": w.budget, "data-winner": w.method || "" }, `KL ≤ ${w.budget}: ${cells}; best: ${w.method ? METHOD_NAMES[w.method] : "none beats unsteered"}`);
  }));
  // The steer view is suggested the strength of the dictionary's own method that did best within the largest budget.
  const budget = Math.max(...result.winners.map((w) => w.budget));
  const own = result.best.filter((b) => b.budget === budget && b.point && b.method !== "mean_difference" && b.point.multiple > 0)
    .sort((a, b) => b.point[effect] - a.point[effect])[0];
  if (own) {
    $("#steer-this").href = href("steer", { dictionary: f.dictionary.name, feature: f.feature, mode: own.method, value: own.point.strength.toFixed(2),
      suggested: `${own.method} ×${own.point.multiple} of the max activation: the most ${effect} within KL ${budget} (KL ${own.point.kl.toFixed(3)})` });
    $("#steer-this").textContent = `steer this feature (suggested: ${own.method} ${own.point.strength.toFixed(2)}) →`;
  }
}

// ---- inspect a text: every ticked dictionary read in one request, one column each per token -----------------------
let inspected = null;  // {text, readouts: [{dictionary, tokens}], selected, highlight}

function tickCurrent() {
  const box = $("#inspect-dictionaries");
  if (!box.children.length) {
    box.replaceChildren(...loaded.map((d) => el("label", {}, el("input", { type: "checkbox", value: d.name }), ` ${d.name} v${d.version}`)));
  }
  const mine = box.querySelector(`input[value="${CSS.escape(nameOf(current()))}"]`);
  if (mine) mine.checked = true;
}

async function inspect(text) {
  const names = [...document.querySelectorAll("#inspect-dictionaries input:checked")].map((box) => box.value);
  if (!names.length) throw new Error("tick at least one dictionary to read the text with");
  const result = await post("/v1/activations", names.length > 1 ? { text, top_k: 5, dictionaries: names } : { text, top_k: 5, dictionary: names[0] });
  inspected = { text, readouts: result.readouts.length ? result.readouts : [{ dictionary: result.dictionary, tokens: result.tokens }], selected: null, highlight: null };
  renderInspected();
}

function renderInspected() {
  const { text, readouts, selected, highlight } = inspected;
  const rows = readouts.map((r) => r.tokens.slice(1));  // the BOS token is not part of the text
  const max = highlight ? Math.max(1e-9, ...highlight.values) : 0;
  $("#inspect-tokens").replaceChildren(...rows[0].map((t, i) => {
    const span = el("span", { class: "tok" + (i === selected ? " selected" : ""), "data-index": i,
      onclick: () => { inspected.selected = i; renderInspected(); $(`#inspect-table tr[data-index="${i}"]`).scrollIntoView({ block: "nearest" }); } },
    visible(text.slice(t.start, t.end)));
    if (highlight) span.style.background = shade(highlight.values[i], max);
    return span;
  }));
  $("#inspect-detail").replaceChildren(highlight
    ? el("p", {}, "highlighting ", featureLink(highlight.id, "", highlight.dictionary), ` of ${highlight.dictionary} over the text (max ${max.toFixed(2)})`)
    : el("p", { class: "muted" }, "each token's strongest features, one column per dictionary: click a feature to highlight it over the text"));
  $("#inspect-table thead").replaceChildren(el("tr", {}, el("th", {}, "token"),
    ...readouts.map((r) => el("th", {}, `${r.dictionary.name} v${r.dictionary.version}`))));
  $("#inspect-table tbody").replaceChildren(...rows[0].map((t, i) => el("tr", { "data-index": i, class: i === selected ? "selected" : "" },
    el("td", { class: "token" }, JSON.stringify(t.text)),
    ...readouts.map((r, d) => {
      const token = rows[d][i], name = r.dictionary.name;
      return el("td", { "data-dictionary": name },
        el("div", { class: "muted" }, `L0 ${token.l0} · err ${token.recon_error.toFixed(3)}`),
        ...token.top.map((f) => el("span", { class: "chip" },
          el("button", { type: "button", class: "highlight", "data-feature": f.feature, "data-dictionary": name, "data-value": f.value,
            onclick: () => highlightFeature(f.feature, name).catch((e) => showError(e.message)) }, `#${f.feature} ${f.value.toFixed(2)}`),
          el("a", { href: href(`feature/${f.feature}`, { dictionary: name }), title: "open the feature" }, "↗"))));
    }))));
  $("#inspect-table").hidden = false;
}

async function highlightFeature(feature, dictionary) {
  const result = await post("/v1/activations", { text: inspected.text, top_k: 0, feature_ids: [feature], dictionary });
  inspected.highlight = { id: feature, dictionary, values: result.tokens.slice(1).map((t) => t.values[0]) };
  renderInspected();
}

// ---- steer -----------------------------------------------------------------------------------------------------------
function addSteerRow({ feature = "", mode = "clamp", value = "10", dictionary = nameOf(current()) } = {}) {
  const select = (cls, options, chosen) => {
    const s = el("select", { class: cls }, ...options.map((o) => el("option", { value: o }, o)));
    s.value = chosen;
    return s;
  };
  const row = el("div", { class: "steer-row" },
    select("steer-dictionary", loaded.map((d) => d.name), dictionary),
    el("input", { type: "number", min: "0", placeholder: "feature #", class: "steer-feature", value: feature }),
    select("steer-mode", ["clamp", "add"], mode),
    el("input", { type: "number", step: "0.5", class: "steer-value", value }),
    el("button", { type: "button", onclick: () => row.remove() }, "×"));
  $("#steer-rows").append(row);
}

// #/steer?dictionary=D&feature=N[&value=V&mode=M] ("steer this feature") fills the form with that one feature.
let prefilled = null;

function prefillSteer(params) {
  const wanted = params.has("feature") ? query({ dictionary: nameOf(current()), feature: params.get("feature"), mode: params.get("mode") || "clamp", value: params.get("value") || "10" }) : null;
  if (wanted && wanted !== prefilled) {
    $("#steer-rows").replaceChildren();
    addSteerRow(Object.fromEntries(new URLSearchParams(wanted)));
  } else if (!$("#steer-rows").children.length) addSteerRow();
  prefilled = wanted;
  $("#steer-suggested").textContent = params.get("suggested") ? `suggested by the steering curve: ${params.get("suggested")}` : "";
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
    .map((row) => ({ dictionary: row.querySelector(".steer-dictionary").value, feature: Number(row.querySelector(".steer-feature").value),
      mode: row.querySelector(".steer-mode").value, value: Number(row.querySelector(".steer-value").value) }));
  const body = { prompt: $("#steer-prompt").value, max_new_tokens: Number($("#steer-tokens").value), dictionary: current(),
    temperature: Number($("#steer-temperature").value), seed: Number($("#steer-seed").value) };
  $("#steer-status").textContent = "generating…";
  const [steered, plain] = await Promise.all([stream({ ...body, steering }, $("#steer-steered")), stream(body, $("#steer-plain"))]);
  $("#steer-status").textContent = `steered: ${steered.finish_reason}, unsteered: ${plain.finish_reason} · seed ${steered.seed} · features of ${steered.dictionary.name}`;
}

// ---- routing -----------------------------------------------------------------------------------------------------------
function show(view) {
  for (const name of views) $(`#view-${name}`).hidden = name !== view;
  document.querySelectorAll("nav a").forEach((a) => {
    a.classList.toggle("active", a.dataset.view === view);
    a.href = href(a.dataset.view === "search" ? "" : a.dataset.view);  // the nav keeps the dictionary
  });
  $(".brand").href = href("");
}

async function route() {
  showError("");
  const { path, params } = here();
  if (!params.get("dictionary") && loaded.length) history.replaceState(null, "", href(path, Object.fromEntries(params)));
  const info = infoOf(current());
  $("#dictionary").value = info ? info.name : "";
  $("#dictionary-info").textContent = info ? `${info.architecture} ${info.d_in}→${info.d_sae} · ${info.hook}` : "";
  const feature = path.match(/^feature\/(\d+)$/);
  try {
    if (feature) { show("feature"); await showFeature(Number(feature[1])); }
    else if (path === "inspect") { show("inspect"); tickCurrent(); }
    else if (path === "steer") { show("steer"); prefillSteer(params); }
    else { show("search"); await showStart(params); }
  } catch (error) { showError(error.message); }
}

function guard(fn) {
  return (event) => { event.preventDefault(); showError(""); fn().catch((error) => showError(error.message)); };
}

$("#dictionary").addEventListener("change", (e) => update({ dictionary: e.target.value, page: "", list_page: "", prefix: "" }));
$("#search-form").addEventListener("submit", (e) => { e.preventDefault(); update({ q: $("#search-q").value, by: $("#search-by").value, page: "" }, "search"); });
$("#list-order").addEventListener("change", (e) => update({ order: e.target.value, list_page: "" }));
$("#list-prefix").addEventListener("change", (e) => update({ prefix: e.target.value, list_page: "" }));
$("#random-feature").addEventListener("click", guard(randomFeature));
$("#goto-feature").addEventListener("change", (e) => { if (e.target.value !== "") go(`feature/${e.target.value}`); });
$("#inspect-form").addEventListener("submit", guard(() => inspect($("#inspect-text").value)));
$("#steer-form").addEventListener("submit", guard(steer));
$("#steer-add").addEventListener("click", () => addSteerRow());
$("#steer-eval-form").addEventListener("submit", guard(measureSteering));
$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
  $("#api-key").value = "";
  location.reload();  // every view again, with the key
});
$("#key-state").textContent = sessionStorage.getItem(KEY_STORAGE) ? "key set" : "";
api("/v1/dictionaries").then((d) => {
  loaded = d.dictionaries;
  $("#dictionary").replaceChildren(...loaded.map((info) => el("option", { value: info.name }, `${info.name} v${info.version}${info.default ? " (default)" : ""}`)));
  window.addEventListener("hashchange", route);
  return route();
}).catch((error) => showError(error.message));
