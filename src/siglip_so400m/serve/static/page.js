// The page of `siglip-so400m serve --index`: plain JavaScript, no build step, nothing from elsewhere.
// It calls the server's JSON endpoints (/v1/search, /v1/classify) and its row images (/v1/images/ROW/...)
// with fetch(), so that an API key travels in the Authorization header, never in a URL; images become
// blob: URLs. The key is asked for on the first 401 and kept in sessionStorage: this tab only.
// Captions and metadata come from the web: they are only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 24;  // hits per "Load more"
const KEY = "siglip-so400m-api-key";
let state = null;  // the current search: {query, kind, label, k, hits}
let latest = 0;  // the number of the last search started: an older answer arriving late is dropped
let blobs = [];  // blob: URLs shown now, revoked by the next search
const groups = new Map();  // id of a group's best hit -> the list its near-duplicates go in

class Refused extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function el(tag, props = {}, ...children) {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...children);
  return e;
}

// fetch() with the key; a 401 asks for the key and tries again; any other refusal throws the
// server's own message.
async function call(path, body) {
  for (;;) {
    const key = sessionStorage.getItem(KEY);
    const headers = key ? {Authorization: `Bearer ${key}`} : {};
    const init = {headers};
    if (body !== undefined) {
      Object.assign(init, {method: "POST", body: JSON.stringify(body)});
      headers["Content-Type"] = "application/json";
    }
    const r = await fetch(path, init);
    if (r.status === 401 && await askKey(key)) continue;
    if (r.ok) return r;
    let message = `${r.status} ${r.statusText}`;
    try { message = (await r.json()).error.message; } catch { /* not our JSON */ }
    throw new Refused(r.status, message);
  }
}

let asking = null;  // one key dialog for every request that got a 401 at once
function askKey(tried) {
  if (tried !== sessionStorage.getItem(KEY)) return Promise.resolve(true);  // a newer key came
  if (asking) return asking;
  $("key-note").textContent = tried ? "That key was refused. Enter the server's API key."
    : "This server asks for its API key. The page keeps it for this tab only.";
  $("key").value = "";
  $("key-dialog").showModal();
  asking = new Promise((done) => {
    const finish = (ok) => {
      $("key-form").onsubmit = $("key-cancel").onclick = $("key-dialog").oncancel = null;
      $("key-dialog").close();
      asking = null;
      done(ok);
    };
    $("key-form").onsubmit = (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, $("key").value);
      finish(true);
    };
    $("key-cancel").onclick = $("key-dialog").oncancel = () => finish(false);
  });
  return asking;
}

function fail(e) {
  $("status").textContent = "";
  $("error").textContent = e instanceof Refused ? `The server refused: ${e.message}` : String(e);
  $("error").hidden = false;
}

async function showImage(img, path) {
  try {
    const r = await call(path);
    const why = r.headers.get("X-Placeholder");
    if (why) img.title = img.alt = `image unavailable: ${why}`;
    const url = URL.createObjectURL(await r.blob());
    blobs.push(url);
    img.src = url;
    return url;
  } catch (e) {
    img.alt = e.message;
    throw e;
  }
}

async function search(query, kind, label, k = PAGE) {
  $("error").hidden = true;
  $("status").textContent = "Searching…";
  const body = {...query, k};
  if ($("fold").checked) body.fold = Number($("fold-at").value);
  const mine = ++latest;
  try {
    const hits = (await (await call("/v1/search", body)).json()).data[0].hits;
    if (mine !== latest) return;
    const more = state && state.query === query ? state.hits.length : 0;  // "Load more": keep those
    if (!more) {
      blobs.forEach(URL.revokeObjectURL);
      blobs = [];
      groups.clear();
      $("results").replaceChildren();
    }
    state = {query, kind, label, k, hits};
    hits.slice(more).forEach(add);
    const shown = hits.filter((h) => !h.duplicate_of).length;
    $("status").textContent = `${shown} result${shown === 1 ? "" : "s"} for ${label}, best first`
      + (hits.length > shown ? ` (${hits.length - shown} near-duplicates folded)` : "")
      + (kind === "text" ? "; p = SigLIP's probability that the image matches the text"
        : "; cos = cosine similarity to the query image");
    $("more").hidden = hits.length < k;
    $("download").disabled = false;
  } catch (e) { if (mine === latest) fail(e); }
}

function add(hit) {
  const folded = groups.get(hit.duplicate_of);
  if (folded) {
    folded.append(tile(hit));
    const button = folded.parentElement.querySelector(".similar");
    button.hidden = false;
    button.textContent = `+${folded.children.length} similar`;
    return;
  }
  const li = tile(hit);
  const list = el("ol", {className: "folded", hidden: true});
  const toggle = el("button", {type: "button", className: "similar", hidden: true});
  toggle.setAttribute("aria-expanded", "false");
  toggle.onclick = () => {
    list.hidden = !list.hidden;
    toggle.setAttribute("aria-expanded", String(!list.hidden));
  };
  li.append(toggle, list);
  groups.set(hit.id, list);
  $("results").append(li);
}

function tile(hit) {
  const img = el("img", {alt: hit.caption || hit.path});
  showImage(img, `/v1/images/${hit.id}/thumbnail`).catch(() => {});
  const score = state.kind === "text" ? `p = ${(100 * hit.score).toFixed(1)}%`
    : `cos ${hit.score.toFixed(3)}`;
  const facts = el("dl");
  for (const [k, v] of Object.entries(hit.metadata || {})) {
    if (v !== null && v !== "" && k !== "caption") facts.append(el("dt", {textContent: k}), el("dd", {textContent: String(v)}));
  }
  const actions = el("p", {className: "actions"},
    button("More like this", () => search({rows: [hit.id]}, "row", `row ${hit.id} (${hit.path})`)),
    button("Full image", () => view(`Row ${hit.id}: ${hit.path}`, `/v1/images/${hit.id}`, "")));
  if (state.kind === "text") {
    actions.append(button("Why this matched", () => view(`Why row ${hit.id} matched`,
      `/v1/images/${hit.id}/attention`,
      "Brighter is where the image tower's pooling head (MAP) looked to make this image's embedding; "
      + `the map is the same for every query. The text scored p = ${(100 * hit.score).toFixed(1)}% `
      + "against that embedding.")));
  }
  const thumb = button("", () => view(`Row ${hit.id}: ${hit.path}`, `/v1/images/${hit.id}`, ""));
  thumb.className = "thumb";
  thumb.setAttribute("aria-label", `full image of row ${hit.id}`);
  thumb.append(img);
  const li = el("li", {className: "hit"}, thumb,
    el("p", {className: "score", textContent: score}),
    el("p", {className: "caption", textContent: hit.caption || hit.path}),
    el("details", {}, el("summary", {textContent: "metadata"}), facts), actions);
  li.dataset.row = hit.id;
  return li;
}

function button(text, onclick) {
  return el("button", {type: "button", textContent: text, onclick});
}

async function view(title, path, note) {
  $("viewer-title").textContent = title;
  $("viewer-note").textContent = note;
  $("viewer-img").removeAttribute("src");
  $("viewer-open").removeAttribute("href");
  $("viewer").showModal();
  try {
    $("viewer-open").href = await showImage($("viewer-img"), path);
    $("viewer-img").alt = title;
  } catch (e) {
    $("viewer").close();
    fail(e);
  }
}

// ---- image queries: upload, drop, paste ----

let queryImage = null;  // the uploaded image as a data: URI, for /v1/classify too

function imageQuery(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => {
    queryImage = reader.result;
    $("query-preview").src = queryImage;
    $("query-image").hidden = false;
    $("predictions").replaceChildren();
    search({images: [queryImage]}, "image", `the image ${file.name || "pasted"}`);
  };
  reader.readAsDataURL(file);
}

async function classify(e) {
  e.preventDefault();
  const labels = $("labels").value.split(/[,\n]/).map((s) => s.trim()).filter(Boolean);
  $("error").hidden = true;
  try {
    const r = await call("/v1/classify", {images: [queryImage], labels});
    const preds = (await r.json()).data[0].predictions;
    $("predictions").replaceChildren(...preds.map((p) =>
      el("li", {textContent: `${p.label}: p = ${(100 * p.score).toFixed(1)}%`})));
  } catch (err) { fail(err); }
}

function download() {
  const json = JSON.stringify({query: state.label, kind: state.kind, hits: state.hits}, null, 1);
  const a = el("a", {href: URL.createObjectURL(new Blob([json], {type: "application/json"})),
    download: "siglip-results.json"});
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

$("search").onsubmit = (e) => {
  e.preventDefault();
  const text = $("q").value.trim();
  if (text) search({texts: [text]}, "text", `“${text}”`);
};
$("file").onchange = () => imageQuery($("file").files[0]);
$("classify").onsubmit = classify;
$("more").onclick = () => search(state.query, state.kind, state.label, state.k + PAGE);
$("download").onclick = download;
$("viewer-close").onclick = () => $("viewer").close();
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  e.preventDefault();
  imageQuery(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const file = [...e.clipboardData.files].find((f) => f.type.startsWith("image/"));
  if (file) { e.preventDefault(); imageQuery(file); }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "/" && !["INPUT", "TEXTAREA"].includes(document.activeElement.tagName)) {
    e.preventDefault();
    $("q").focus();
  }
});
$("q").focus();
