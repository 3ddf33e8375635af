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

// ---- this node's files -------------------------------------------------------------------------
async function loadMine() {
  const data = await api("GET", "files");
  if (!data) return;
  const body = $("#my-files tbody");
  body.replaceChildren(...data.ListFiles.map((f) => {
    const name = baseName(f.name);
    return el("tr", { "data-name": name }, el("td", {}, name), el("td", { className: "num" }, size(f.size)),
      el("td", {}, el("a", { className: "button secondary", href: BASE + "files/" + encodeURIComponent(name), download: name }, "Save")));
  }));
  if (!data.ListFiles.length) body.append(el("tr", {}, el("td", { colspan: 3, className: "detail" }, "No files yet.")));
}

function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
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
    if (data.files && data.files.length) parts.push(`Uploaded ${data.files.map((f) => f.name).join(", ")}.`);
    if (data.refused && data.refused.length) parts.push(`Refused: ${data.refused.map((f) => f.reason).join("; ")}.`);
    if (!parts.length) parts.push(data.error || `Upload failed (${xhr.status}).`);
    msg.textContent = parts.join(" ");
    msg.className = "msg " + (xhr.status === 200 && !(data.refused && data.refused.length) ? "ok" : "err");
    loadMine();
  };
  xhr.onerror = () => { $("#upload").hidden = true; msg.textContent = "Upload failed: the node did not answer."; msg.className = "msg err"; };
  xhr.open("POST", BASE + "files");
  xhr.send(form);
}

// ---- another node's files ----------------------------------------------------------------------
async function listPeer(node) {
  const err = $("#peer-error"), table = $("#peer-files");
  err.textContent = "";
  table.hidden = true;
  try {
    const data = await api("GET", "files?node=" + encodeURIComponent(node));
    if (!data) return;
    $("#peer-files tbody").replaceChildren(...data.ListFiles.map((f) => {
      const name = baseName(f.name);
      return el("tr", { "data-name": name }, el("td", {}, name), el("td", { className: "num" }, size(f.size)),
        el("td", {}, el("button", { className: "download", "data-name": name, onclick: () => download(name, node) }, "Download")));
    }));
    if (!data.ListFiles.length) $("#peer-files tbody").append(el("tr", {}, el("td", { colspan: 3 }, `${node} shares no files.`)));
    table.hidden = false;
  } catch (e) {
    err.textContent = e.message;
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
  $("#transfers").replaceChildren(...state.Transfers.map((t) => {
    const cancelButton = el("button", { className: "secondary cancel", onclick: () => cancel(t.name, t.node) }, "Cancel");
    if (t.queued) {
      return el("li", { "data-name": t.name, className: "queued" },
        el("div", { className: "row" }, el("span", { className: "name" }, `${t.name} from ${t.node}`), cancelButton),
        el("div", { className: "detail" }, "queued: waits for a free slot"));
    }
    if (t.queued_at) {  // our worker waits in the provider's queue
      return el("li", { "data-name": t.name, className: "queued" },
        el("div", { className: "row" }, el("span", { className: "name" }, `${t.name} from ${t.node}`), cancelButton),
        el("div", { className: "detail" }, `queued at ${t.node}, position ${t.queued_at}`));
    }
    const pct = t.total ? Math.floor(100 * t.bytes / t.total) : 0;
    const eta = t.rate > 0 && t.total ? (t.total - t.bytes) / t.rate : Infinity;
    return el("li", { "data-name": t.name, className: "active" },
      el("div", { className: "row" }, el("span", { className: "name" }, `${t.name} from ${t.node}`), cancelButton),
      el("progress", { max: 100, value: pct }),
      el("div", { className: "detail" },
        `${pct}% · ${size(t.bytes)} of ${size(t.total)} · ${size(t.rate || 0)}/s · ETA ${seconds(eta)}`));
  }));
  if (!state.Transfers.length) $("#transfers").append(el("li", { className: "detail" }, "No download running."));
  $("#history").replaceChildren(...state.history.map((h) => el("li", { "data-name": h.name, className: h.ok ? "done" : "failed" },
    el("div", { className: "row" }, el("span", { className: "name" }, `${h.name} from ${h.node}`)),
    el("div", { className: "detail" }, h.ok ? `done: ${size(h.bytes)} in ${(h.secs || 0).toFixed(2)} s` : `failed: ${h.error}`))));
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
const drop = $("#drop");
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => upload(e.dataTransfer.files));
$("#peer-form").addEventListener("submit", (e) => { e.preventDefault(); listPeer($("#peer-node").value.trim()); });
$("#allow-form").addEventListener("submit", (e) => { e.preventDefault(); saveAllow($("#allow-input").value); });
loadMine();
refreshTransfers();
connect();
