"use strict";
// The daunce serve page: plain DOM calls on the JSON API. Every text from the store or the data files is
// set with textContent (never innerHTML), so markup in a training text shows as text and never runs.

const $ = (id) => document.getElementById(id);
const page = document.body.dataset.page;
let info = null;        // /api/info: columns, query sets, data files
let shownColumns = -1;  // the K the current view was computed with

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

async function api(path, params = {}) {
  const url = new URL(path, location.origin);
  for (const [key, value] of Object.entries(params)) {
    for (const v of [].concat(value)) url.searchParams.append(key, v);
  }
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function post(path, body) {
  const response = await fetch(new URL(path, location.origin), {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}

// A text's runs without whitespace longer than LONG_RUN get a break opportunity (<wbr>) every LONG_RUN
// characters: the browser wraps them there instead of searching every character for a break (a 100 KB
// token under `overflow-wrap: anywhere` froze the tab for a minute), and ordinary words never split.
const LONG_RUN = 32;
const LONG_RUN_RE = new RegExp(`\\S{${LONG_RUN + 1},}`, "g");

function textBlock(cls, text) {
  const box = el("div", cls);
  let last = 0;
  for (const m of text.matchAll(LONG_RUN_RE)) {
    box.append(text.slice(last, m.index));
    for (let i = 0; i < m[0].length; i += LONG_RUN) {
      if (i) box.append(el("wbr"));
      box.append(m[0].slice(i, i + LONG_RUN));
    }
    last = m.index + m[0].length;
  }
  box.append(text.slice(last));
  return box;
}

function showError(err) { $("error").textContent = err ? String(err.message || err) : ""; }

function pixels(value) {
  // An (h, w) or (h, w, 3) array as a canvas, brightness scaled to the column's range over the file.
  const canvas = el("canvas", "pixels");
  canvas.width = value.width; canvas.height = value.height;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(value.width, value.height);
  const span = (value.max - value.min) || 1;
  for (let p = 0; p < value.width * value.height; p++) {
    for (let c = 0; c < 3; c++) {
      const v = value.values[value.channels === 3 ? 3 * p + c : p];
      img.data[4 * p + c] = Math.round(255 * ((v ?? value.min) - value.min) / span);
    }
    img.data[4 * p + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return canvas;
}

function content(set, id, example) {
  const box = el("div", "content");
  if (!example) { box.append(el("span", "field", "(no row in the data file)")); return box; }
  // The label column is not among the fields (it is the card's label); a null value is nothing to show,
  // and for an image file it means the server will not serve one: no request for it.
  for (const f of example.fields) {
    if (f.value === null) continue;
    if (f.kind === "pixels") box.append(pixels(f.value));
    else if (f.kind === "image" && f.value.startsWith("data:image/")) {
      const img = el("img", "picture"); img.alt = f.name; img.src = f.value; box.append(img);
    } else if (f.kind === "image-file") {
      const img = el("img", "picture"); img.alt = f.name;
      img.src = `/api/image?${new URLSearchParams({set, id, column: f.name})}`; box.append(img);
    } else if (f.kind === "text") box.append(textBlock("text", f.value));
    else box.append(textBlock("field", `${f.name}: ${f.value}`));
  }
  return box;
}

function card(set, id, example, parts) {
  const li = el("li", "card");
  const meta = el("div", "meta");
  for (const p of parts) meta.append(p, el("br"));
  meta.append(el("span", "id", id));
  if (example && example.label !== null && example.label !== undefined) meta.append(" ", el("span", "label", example.label));
  li.append(meta, content(set, id, example));
  return li;
}

async function examples(set, ids) {
  if (!info || !info.data[set] || ids.length === 0) return {};
  return (await api("/api/examples", {set, id: ids})).examples;
}

function scoreText(s, side) { return el("span", `score ${side}`, s === null ? "—" : s.toPrecision(3)); }

async function loadInfo() {
  info = await api("/api/info");
  $("store").textContent = `${info.url} · n=${info.n_train}`;
  $("columns").textContent = `K = ${info.columns}`;
  const measure = $("measure");
  if (!measure.options.length) {  // the top-k page opens on the measure for reading lists, self-influence on the default
    const initial = page === "self" ? info.default_measure : info.topk_measure;
    for (const m of info.measures) measure.append(new Option(m, m, m === initial, m === initial));
  }
}

// --- the top-k page ------------------------------------------------------------------------------
async function loadQueries() {
  const set = $("query-set").value;
  if (!set) return;
  const r = await api("/api/queries", {query_set: set, contains: $("filter").value, limit: 500});
  const select = $("query");
  const keep = select.value;
  select.replaceChildren(...r.ids.map((q) => new Option(q, q)));
  if (r.ids.includes(keep)) select.value = keep;
}

function stabilityTable(st) {
  const box = $("stability");
  box.replaceChildren();
  const table = el("table");
  const cols = Object.keys(st.summary[0]).filter((c) => c !== "query");
  const head = el("tr");
  for (const c of cols) head.append(el("th", "", c === "side" ? "" : c.replace("overlap@", "top-k overlap at ")));
  table.append(head);
  for (const row of st.summary) {
    const tr = el("tr");
    for (const c of cols) {
      const v = row[c];
      tr.append(el("td", "", c === "side" ? (v === "pos" ? "proponents" : "opponents")
        : v === null ? "—" : c.startsWith("overlap") || c === "bootstrap_overlap" ? `${Math.round(100 * v)}%` : v.toPrecision(2)));
    }
    table.append(tr);
  }
  const caption = el("caption", "", `How settled is this top-${st.records.length / st.summary.length} at K = ${st.num_columns}? ` +
    "Overlap at K=c: share of the list also in the top-k from the first c columns; bootstrap_overlap: share kept " +
    "when the K columns are resampled; median_rel_stderr: typical bootstrap error of a listed score relative to it.");
  table.append(caption);
  box.append(table);
}

// Requests overlap (a change while the last answer is on its way): only the newest one may draw, so an
// older answer arriving late never replaces a newer one.
let drawing = 0;

// The URL holds the view (reload it, share it): the controls are read from it at start and written to it
// on every change.
function fromUrl(names) {
  const url = new URLSearchParams(location.search);
  for (const name of names) {
    const value = url.get(name);
    if (value === null) continue;
    const control = $(name.replace("_", "-"));
    if (control.tagName === "SELECT" && ![...control.options].some((o) => o.value === value)) control.append(new Option(value, value));
    control.value = value;
  }
}

function toUrl(params) {
  const url = `${location.pathname}?${new URLSearchParams(params)}`;
  if (url !== location.pathname + location.search) history.replaceState(null, "", url);
}

async function showStability(params, mine) {
  // Apart from the lists: a stability refused (over the server's caps, or the expensive lane busy) leaves them shown.
  const bootstrap = Math.min(10, info.limits.max_bootstrap_one_query);
  try {
    const st = await api("/api/stability", {...params, bootstrap});
    if (mine === drawing) stabilityTable(st);
  } catch (err) {
    if (mine === drawing) $("stability").replaceChildren(el("p", "hint", `stability: ${err.message || err}`));
  }
}

async function showTopk() {
  const set = $("query-set").value, query = $("query").value;
  if (!set || !query) return;
  const mine = ++drawing;
  const params = {query_set: set, query, k: $("k").value, measure: $("measure").value};
  toUrl(params);
  const st = showStability(params, mine);
  const top = await api("/api/topk", params);
  const ids = [...new Set(top.records.map((r) => r.train_id))];
  const [train, queries] = await Promise.all([examples("train", ids), examples(set, [query])]);
  if (mine !== drawing) return;
  shownColumns = top.num_columns;
  $("query-view").replaceChildren(el("h2", "", `Query (${top.measure}, K = ${top.num_columns})`),
    card(set, query, queries[query], [el("span", "rank", set)]));
  showSides(top.records, train);
  await st;
}

async function startTopk() {
  await loadInfo();
  const sets = Object.keys(info.query_sets);
  $("query-set").replaceChildren(...sets.map((s) => new Option(s, s)));
  fromUrl(["query_set", "k", "measure"]);
  await loadQueries();
  fromUrl(["query"]);
  const rerun = () => showTopk().then(() => showError(null), showError);
  $("query-set").onchange = () => loadQueries().then(rerun, showError);
  $("filter").oninput = () => loadQueries().catch(showError);
  for (const id of ["query", "k", "measure"]) $(id).onchange = rerun;
  rerun();
  return rerun;
}

function showSides(records, train) {
  for (const side of ["pos", "neg"]) {
    $(side).replaceChildren(...records.filter((r) => r.side === side).map((r) =>
      card("train", r.train_id, train[r.train_id], [el("span", "rank", `#${r.rank}`), scoreText(r.score, side)])));
  }
}

// --- the new-output page: a new example under the store's kept adapters ----------------------------
function askedExample() {
  // A classifier run's rows are text and label; a causal LM's, prompt and the output to explain.
  const first = $("prompt").value, second = $("completion").value;
  return info.attribute.recipe === "classifier" ? {rows: [{text: first, label: second}]} : {prompt: first, completion: second};
}

async function showAttribute() {
  if (!info.attribute.available || !$("prompt").value || !$("completion").value) return;
  const mine = ++drawing;
  const params = {k: $("k").value, measure: $("measure").value};
  toUrl(params);
  let top, train;
  const asked = askedExample();
  try {
    top = await post("/api/attribute", {...asked, k: Number(params.k), measure: params.measure});
    train = await examples("train", [...new Set(top.records.map((r) => r.train_id))]);
  } catch (err) {
    if (mine === drawing) throw err;  // a newer request is on its way: this one's error is no longer news
    return;
  }
  if (mine !== drawing) return;
  shownColumns = top.num_columns;
  const fields = Object.entries(asked.rows ? asked.rows[0] : asked).map(([name, value]) => ({name, kind: "text", value: `${name}: ${value}`}));
  $("query-view").replaceChildren(el("h2", "", `New example (${top.measure}, K = ${top.num_columns})`),
    card("new", top.records.length ? top.records[0].query : "new-0", {fields, label: null}, [el("span", "rank", "new")]));
  showSides(top.records, train);
}

async function startAttribute() {
  await loadInfo();
  fromUrl(["k", "measure"]);
  if (info.attribute.recipe === "classifier") {
    $("prompt-label").firstChild.textContent = "text ";
    $("completion-label").firstChild.textContent = "label ";
  }
  if (!info.attribute.available) {
    $("ask").disabled = true;
    $("attribute-hint").textContent = `New outputs cannot be attributed on this store: ${info.attribute.reason}.`;
  }
  const rerun = () => showAttribute().then(() => showError(null), showError);
  $("controls").addEventListener("submit", rerun);
  // k and measure redraw an answer already shown (K forward passes each time: never while the example is typed)
  for (const id of ["k", "measure"]) $(id).onchange = () => { if (shownColumns >= 0) rerun(); };
  return rerun;
}

// --- the self-influence page ---------------------------------------------------------------------
async function showSelf() {
  const side = $("side").value;
  const mine = ++drawing;
  const params = {k: $("k").value, measure: $("measure").value, side};
  toUrl(params);
  const r = await api("/api/self-influence", params);
  const ids = r.records.map((x) => x.train_id);
  const train = await examples("train", ids);
  if (mine !== drawing) return;
  shownColumns = r.num_columns;
  $("self").replaceChildren(...r.records.map((x) =>
    card("train", x.train_id, train[x.train_id], [el("span", "rank", `#${x.rank}`), scoreText(x.score, "pos")])));
}

async function startSelf() {
  await loadInfo();
  fromUrl(["k", "side", "measure"]);
  const rerun = () => showSelf().then(() => showError(null), showError);
  for (const id of ["k", "side", "measure"]) $(id).onchange = rerun;
  rerun();
  return rerun;
}

$("controls").addEventListener("submit", (e) => e.preventDefault());  // Enter in a field: no page reload

// --- refresh: new perturbation columns land while the page is open ------------------------------
(async () => {
  try {
    const rerun = await ({self: startSelf, attribute: startAttribute}[page] || startTopk)();
    setInterval(async () => {
      try {
        await loadInfo();
        const now = page === "topk" ? (info.query_sets[$("query-set").value] || {}).columns : info.columns;
        if (shownColumns >= 0 && now !== shownColumns) rerun();
      } catch (err) { showError(err); }
    }, 2000);
  } catch (err) { showError(err); }
})();
