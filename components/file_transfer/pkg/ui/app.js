// file_transfer's page: talks to the JSON API beside it and listens to its WebSocket.
"use strict";
const $ = (sel) => document.querySelector(sel);
const BASE = location.pathname.replace(/[^/]*$/, "");  // /file_transfer:file_transfer:template.os/

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "className") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function size(n) {
  if (n == null) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function seconds(s) {
  if (!isFinite(s)) return "?";
  s = Math.round(s);
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
}

const baseName = (path) => path.split("/").pop();

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  const resp = await fetch(BASE + path, opts);
  if (resp.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); return null; }
  let data = null;
  try { data = await resp.json(); } catch (e) { data = { error: `${resp.status} ${resp.statusText}` }; }
  if (!resp.ok) throw new Error((data && data.error) || `${resp.status} ${resp.statusText}`);
  return data;
}

// ---- listings with folders ---------------------------------------------------------------------
const isFolder = (f) => f.name.endsWith("/");
const rowName = (f) => isFolder(f) ? baseName(f.name.slice(0, -1)) + "/" : baseName(f.name);
const inFolder = (folder, name) => folder ? `${folder}/${name}` : name;

// the path above a listing: each folder up to the drive's top is a link back to it
function crumbs(nav, top, folder, open) {
  const parts = folder ? folder.split("/") : [];
  const links = [el("a", { href: "#", "data-folder": "", onclick: (e) => { e.preventDefault(); open(""); } }, top)];
  parts.forEach((part, i) => {
    const path = parts.slice(0, i + 1).join("/");
    links.push(" / ", i === parts.length - 1 ? el("strong", {}, part)
      : el("a", { href: "#", "data-folder": path, onclick: (e) => { e.preventDefault(); open(path); } }, part));
  });
  nav.replaceChildren(...links);
  nav.hidden = !parts.length;
}

// one table row: a folder opens on click and shows its file count; `action` gives the last cell
function listingRow(f, folder, open, action) {
  const name = rowName(f);
  if (isFolder(f)) {
    const count = f.files == null ? (f.error || "?") : `${f.files} file${f.files === 1 ? "" : "s"}`;
    return el("tr", { "data-name": name, className: "folder" },
      el("td", {}, el("a", { href: "#", className: "open", "data-name": name,
        onclick: (e) => { e.preventDefault(); open(inFolder(folder, name.slice(0, -1))); } }, name),
        " ", el("span", { className: "count" }, count)),
      el("td", { className: "num" }, size(f.size)), el("td", {}, action(name, true)));
  }
  return el("tr", { "data-name": name }, el("td", {}, name), el("td", { className: "num" }, size(f.size)),
    el("td", {}, action(name, false)));
}

// ---- this node's files -------------------------------------------------------------------------
let myFolder = "";

async function loadMine(folder = myFolder) {
  let data;
  try {
    data = await api("GET", "files" + (folder ? "?folder=" + encodeURIComponent(folder) : ""));
  } catch (e) {
    if (folder) { myFolder = ""; return loadMine(""); }  // the folder went away: back to the top
    $("#upload-msg").textContent = e.message; $("#upload-msg").className = "msg err";
    return;
  }
  if (!data) return;
  myFolder = folder;
  crumbs($("#my-path"), "files", folder, loadMine);
  const top = folder.split("/")[0], rest = folder.split("/").slice(1).join("/");
  const save = (name, dir) => {
    if (dir) return "";
    // a file inside a folder: files/TOP?path=REST/NAME
    const href = folder ? `files/${encodeURIComponent(top)}?path=${encodeURIComponent(inFolder(rest, name))}`
      : "files/" + encodeURIComponent(name);
    return el("a", { className: "button secondary", href: BASE + href, download: name }, "Save");
  };
  const body = $("#my-files tbody");
  body.replaceChildren(...data.ListFiles.map((f) => listingRow(f, folder, loadMine, save)));
  if (!data.ListFiles.length) body.append(el("tr", {}, el("td", { colspan: 3, className: "detail" }, folder ? "This folder is empty." : "No files yet.")));
}

function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  // a folder picked with the folder input: each file named by its path inside it (checked by the node)
  for (const f of files) form.append("files", f, f.webkitRelativePath || f.name);
  const xhr = new XMLHttpRequest();
  const bar = $("#upload-progress"), text = $("#upload-text"), msg = $("#upload-msg");
  $("#upload").hidden = false;
  msg.textContent = ""; msg.className = "msg";
  const total = Array.from(files).reduce((n, f) => n + f.size, 0);
  xhr.upload.onprogress = (e) => {
    const done = e.lengthComputable ? e.loaded / e.total : 0;
    bar.value = Math.round(done * 100);
    text.textContent = `${size(Math.min(e.loaded, total))} of ${size(total)}`;
  };
  xhr.onload = () => {
    $("#upload").hidden = true;
    let data = {};
    try { data = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
    if (xhr.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); return; }
    const parts = [];
    // a folder may hold many files: name the first few
    const few = (items, sep) => items.slice(0, 5).join(sep) + (items.length > 5 ? ` and ${items.length - 5} more` : "");
    if (data.files && data.files.length) parts.push(`Uploaded ${few(data.files.map((f) => f.name), ", ")}.`);
    if (data.refused && data.refused.length) parts.push(`Refused: ${few(data.refused.map((f) => f.reason), "; ")}.`);
    if (data.warnings && data.warnings.length) parts.push(data.warnings.join(" "));
    if (!parts.length) parts.push(data.error || `Upload failed (${xhr.status}).`);
    msg.textContent = parts.join(" ");
    msg.className = "msg " + (xhr.status === 200 && !(data.refused && data.refused.length) ? "ok" : "err");
    loadMine("");  // uploads land at the top of the drive
  };
  xhr.onerror = () => { $("#upload").hidden = true; msg.textContent = "Upload failed: the node did not answer."; msg.className = "msg err"; };
  xhr.open("POST", BASE + "files");
  xhr.send(form);
}

// ---- another node's files ----------------------------------------------------------------------
let peerNode = "", peerFolder = "";

async function listPeer(node, folder = "") {
  const err = $("#peer-error"), table = $("#peer-files");
  err.textContent = "";
  try {
    const query = "files?node=" + encodeURIComponent(node) + (folder ? "&folder=" + encodeURIComponent(folder) : "");
    const data = await api("GET", query);
    if (!data) return;
    peerNode = node; peerFolder = folder;
    const open = (path) => listPeer(node, path);
    crumbs($("#peer-path"), node, folder, open);
    // a download fetches a file or a folder at the top of the node's drive, so inside a folder
    // the whole top folder is what one click downloads
    const top = folder.split("/")[0];
    const whole = $("#peer-whole");
    whole.hidden = !folder;
    whole.replaceChildren(...(folder ? [el("button", { className: "download", "data-name": top + "/",
      onclick: () => download(top, node) }, `Download ${top}/ (the whole folder)`)] : []));
    const action = (name, dir) => folder ? "" : el("button", { className: "download", "data-name": name,
      onclick: () => download(dir ? name.slice(0, -1) : name, node) }, "Download");
    $("#peer-files tbody").replaceChildren(...data.ListFiles.map((f) => listingRow(f, folder, open, action)));
    if (!data.ListFiles.length) $("#peer-files tbody").append(el("tr", {}, el("td", { colspan: 3 }, folder ? "This folder is empty." : `${node} shares no files.`)));
    table.hidden = false;
  } catch (e) {
    err.textContent = e.message;
    if (!folder) { table.hidden = true; $("#peer-path").hidden = true; $("#peer-whole").hidden = true; }
  }
}

async function download(name, node) {
  const msg = $("#download-msg");
  msg.textContent = "";
  try { await api("POST", "download", { name, node }); } catch (e) { msg.textContent = e.message; }
  refreshTransfers();
}

async function cancel(name, node, tries = 0) {
  try { await api("DELETE", `transfers/${encodeURIComponent(name)}?node=${encodeURIComponent(node)}`); }
  catch (e) {
    // its worker is still starting: try again shortly
    if (/not started yet/.test(e.message) && tries < 20) { setTimeout(() => cancel(name, node, tries + 1), 250); return; }
    $("#download-msg").textContent = e.message;
  }
  refreshTransfers();
}

// ---- downloads ---------------------------------------------------------------------------------
function showState(state) {
  if (state.node) $("#node-name").textContent = state.node;
  let place = 0;  // downloads waiting here, in order
  $("#transfers").replaceChildren(...state.Transfers.map((t) => {
    const label = `${t.name}${t.of != null ? "/" : ""} from ${t.node}`;
    const cancelButton = el("button", { className: "secondary cancel", onclick: () => cancel(t.name, t.node) }, "Cancel");
    if (t.queued) {
      return el("li", { "data-name": t.name, className: "queued" },
        el("div", { className: "row" }, el("span", { className: "name" }, label), cancelButton),
        el("div", { className: "detail" }, `queued here, position ${++place}: waits for a free slot`));
    }
    if (t.queued_at) {  // our worker waits in the provider's queue
      return el("li", { "data-name": t.name, className: "queued" },
        el("div", { className: "row" }, el("span", { className: "name" }, label), cancelButton),
        el("div", { className: "detail" }, `queued at ${t.node}, position ${t.queued_at}`));
    }
    const pct = t.total ? Math.floor(100 * t.bytes / t.total) : 0;
    const eta = t.rate > 0 && t.total ? (t.total - t.bytes) / t.rate : Infinity;
    return el("li", { "data-name": t.name, className: "active" },
      el("div", { className: "row" }, el("span", { className: "name" }, label), cancelButton),
      el("progress", { max: 100, value: pct }),
      el("div", { className: "detail" },
        `${pct}% · ${t.of != null ? `${t.files || 0} of ${t.of} files · ` : ""}` +
        `${size(t.bytes)} of ${size(t.total)} · ${size(t.rate || 0)}/s · ETA ${seconds(eta)}`));
  }));
  if (!state.Transfers.length) $("#transfers").append(el("li", { className: "detail" }, "No download running."));
  $("#history").replaceChildren(...state.history.map((h) => el("li", { "data-name": h.name, className: h.ok ? "done" : "failed" },
    el("div", { className: "row" }, el("span", { className: "name" }, `${h.name}${h.files != null ? "/" : ""} from ${h.node}`)),
    el("div", { className: "detail" }, !h.ok ? `failed: ${h.error}` : (h.files != null ? `done: folder of ${h.files} files, ` : "done: ") +
      `${size(h.bytes)} in ${(h.secs || 0).toFixed(2)} s` + (h.replaced ? ` · replaced the earlier ${h.name}` : "")))));
  $("#allow-rule").textContent = state.allow == null ? "every node" : (state.allow.length ? state.allow.join(", ") : "no node");
  if (state.history.length !== seenHistory) { seenHistory = state.history.length; loadMine(); }  // a download landed
}
let seenHistory = -1;

async function refreshTransfers() {
  try { const s = await api("GET", "transfers"); if (s) showState(s); } catch (e) { /* the socket will catch up */ }
}

function connect() {
  const ws = new WebSocket(location.origin.replace(/^http/, "ws") + BASE + "ws");
  ws.onopen = () => { $("#live").textContent = "live"; $("#live").className = "badge"; };
  ws.onmessage = (e) => {
    const msg = JSON.parse(e.data);
    if (msg.kind === "state") showState(msg.data);
  };
  ws.onclose = () => { $("#live").textContent = "offline"; $("#live").className = "badge off"; setTimeout(connect, 2000); };
}

// ---- access rule -------------------------------------------------------------------------------
async function saveAllow(text) {
  const t = text.trim();
  const allow = t === "*" || t === "" ? null : t.split(/[\s,]+/).filter(Boolean);
  const msg = $("#allow-msg");
  try {
    await api("PUT", "allow", { allow });
    msg.textContent = "Saved."; msg.className = "msg ok";
    refreshTransfers();
  } catch (e) { msg.textContent = e.message; msg.className = "msg err"; }
}

// ---- wiring ------------------------------------------------------------------------------------
$("#upload-input").addEventListener("change", (e) => { upload(e.target.files); e.target.value = ""; });
$("#upload-folder").addEventListener("change", (e) => { upload(e.target.files); e.target.value = ""; });
const drop = $("#drop");
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => upload(e.dataTransfer.files));
$("#peer-form").addEventListener("submit", (e) => { e.preventDefault(); listPeer($("#peer-node").value.trim()); });
$("#allow-form").addEventListener("submit", (e) => { e.preventDefault(); saveAllow($("#allow-input").value); });
loadMine();
refreshTransfers();
connect();
