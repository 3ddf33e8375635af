// world: kinode:process/process-v0@0.8.0
// The two-toolchain conformance guest, in JavaScript (componentize-js). It and its Python twin
// (../../pyguest/guest/main.py) take the same commands and print the same `guest STEP JSON` lines,
// so tests/conformance/test_two_toolchains.py can ask both the same questions. It calls Kinode's
// ABI directly, as a JavaScript process built with Kinode's kit does.
import {
  printToTerminal, receive, getBlob, sendRequest, sendRequests, sendResponse, sendAndAwaitResponse,
  getState, setState, clearState, spawn, setOnExit, getOnExit,
  ourCapabilities, saveCapabilities, dropCapabilities,
} from 'kinode:process/standard@0.8.0';

const enc = new TextEncoder();
const dec = new TextDecoder();
let OUR = null;

// ---- helpers ------------------------------------------------------------------------------------
function parseAddress(text) {
  const [node, proc] = text.split('@');
  const [processName, packageName, publisherNode] = proc.split(':');
  return { node, process: { processName, packageName, publisherNode } };
}
const addrText = (a) => `${a.node}@${a.process.processName}:${a.process.packageName}:${a.process.publisherNode}`;
const capJson = (c) => ({ issuer: addrText(c.issuer), params: c.params });
const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
const blobJson = (b) => (b == null ? null : { mime: b.mime ?? null, hex: hex(b.bytes) });
const show = (step, value) => printToTerminal(0, `guest ${step} ${JSON.stringify(value)}`);
const jsonBytes = (v) => enc.encode(JSON.stringify(v));

function request(body, opts = {}) {  // expects-response 5 s unless `expects` is given (undefined: none)
  const expects = 'expects' in opts ? opts.expects : 5n;
  return { inherit: opts.inherit ?? false, expectsResponse: expects, body: jsonBytes(body), metadata: opts.metadata,
    capabilities: opts.caps ?? [] };
}

function pattern(n, seed) {  // bytes both guests can rebuild and compare
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 7 + seed) & 0xff;
  return out;
}

function sum(bytes) {
  let s = 0;
  for (const b of bytes) s = (s + b) % 1000000007;
  return s;
}

// A result-returning import throws its error value: componentize-js wraps it as `payload`.
function errorValue(e) {
  return e && typeof e === 'object' && 'payload' in e ? e.payload : e;
}

function messageJson(source, msg) {
  const m = msg.tag === 'request' ? msg.val : msg.val[0];
  const out = {
    source: addrText(source), kind: msg.tag, body: dec.decode(m.body),
    metadata: m.metadata ?? null, caps: m.capabilities.map(capJson),
  };
  if (msg.tag === 'request') out.expects = m.expectsResponse == null ? null : Number(m.expectsResponse);
  else out.context = msg.val[1] == null ? null : dec.decode(msg.val[1]);
  return out;
}

function awaitResponse(target, req, blob, showBlob = true) {
  try {
    const [source, msg] = sendAndAwaitResponse(target, req, blob);
    return { ...messageJson(source, msg), blob: showBlob ? blobJson(getBlob()) : undefined };
  } catch (e) {
    const err = errorValue(e);
    return { error: err.kind, target: addrText(err.target) };
  }
}

function receiveOne() {  // -> ['msg', source, message] or ['err', sendError, context]
  try {
    const [source, msg] = receive();
    return ['msg', source, msg];
  } catch (e) {
    const [err, context] = errorValue(e);
    return ['err', err, context];
  }
}

const vfsAddress = () => parseAddress('our@vfs:distro:sys');
const drive = (name = 'd') => `/${OUR.process.packageName}:${OUR.process.publisherNode}/${name}`;

function vfs(path, action, blob, showBlob = true) {
  return awaitResponse(vfsAddress(), request({ path, action }), blob, showBlob);
}

// ---- commands -----------------------------------------------------------------------------------
function peer(target) {
  const data = pattern(300, 3);
  const got = awaitResponse(parseAddress(target),
    request({ echo: 'héllo ✓ 🎉' }, { metadata: '{"from":"js"}' }),
    { mime: 'application/x-test', bytes: data });
  show('peer', got);
  // the same again unawaited, with a context that must come back with the response
  sendRequest(parseAddress(target), request({ echo: 'second' }), enc.encode('ctx-js'), undefined);
  const [kind, source, msg] = receiveOne();
  show('peer-context', kind === 'msg' ? messageJson(source, msg) : { error: source.kind });
  // several at once (`send-requests`), each with its context and blob
  sendRequests([1, 2, 3].map((i) => [parseAddress(target), request({ echo: `batch ${i}` }),
    enc.encode(`batch-ctx ${i}`), { mime: undefined, bytes: pattern(i * 10, i) }]));
  const answers = [];
  for (let i = 0; i < 3; i++) {
    const [k, src, m] = receiveOne();
    answers.push(k === 'msg' ? { context: dec.decode(m.val[1]), body: JSON.parse(dec.decode(m.val[0].body)),
      blob_len: getBlob()?.bytes.length ?? 0 } : { error: src.kind });
  }
  answers.sort((a, b) => (a.context ?? '').localeCompare(b.context ?? ''));
  show('peer-batch', answers);
}

function answerEcho(source, req) {
  const blob = getBlob();
  const bytes = blob ? blob.bytes : new Uint8Array();
  const body = JSON.parse(dec.decode(req.body));
  show('echo-heard', { source: addrText(source), body, metadata: req.metadata ?? null,
    blob_len: bytes.length, blob_sum: sum(bytes), mime: blob ? blob.mime ?? null : null });
  const back = bytes.slice().reverse();
  sendResponse({ inherit: false, body: jsonBytes({ echoed: body.echo, by: 'js' }), metadata: '{"answer":true}',
    capabilities: [] }, back.length ? { mime: 'application/x-reversed', bytes: back } : undefined);
}

function relay(target) {  // ask the peer for a file of its drive, which the VFS sends us on its behalf
  show('relay', awaitResponse(parseAddress(target), request({ relay_read: true })));
}

function answerRelay() {  // forward with `inherit`: the VFS answers the request we are handling
  const path = `${drive('r')}/relay.txt`;
  vfs(drive('r'), 'CreateDrive');
  vfs(path, 'Write', { mime: undefined, bytes: enc.encode('relayed by js') });
  sendRequest(vfsAddress(), request({ path, action: 'Read' }, { expects: undefined, inherit: true }),
    undefined, undefined);
}

function vfsSteps() {
  const d = drive();
  show('vfs create-drive', vfs(d, 'CreateDrive'));
  const data = pattern(1000, 11);
  show('vfs write', vfs(`${d}/f.bin`, 'Write', { mime: null, bytes: data }));
  const read = vfs(`${d}/f.bin`, 'Read');
  show('vfs read', { body: read.body, mime: read.blob?.mime ?? null, same: read.blob?.hex === hex(data) });
  vfs(`${d}/sub`, 'CreateDirAll');
  const dir = vfs(d, 'ReadDir');
  show('vfs read-dir', JSON.parse(dir.body));
  show('vfs read-missing', JSON.parse(vfs(`${d}/missing`, 'Read').body));
  const got = awaitResponse(vfsAddress(), request({ path: d, action: 'Metadata' }, { metadata: '{"mine":1}' }));
  show('vfs metadata', { body: JSON.parse(got.body), metadata: got.metadata });
  show('vfs root', JSON.parse(vfs('/', 'ReadDir').body));
}

function bigBlob(n) {
  const path = `${drive()}/big.bin`;
  vfs(drive(), 'CreateDrive');
  const data = pattern(n, 5);
  const w = vfs(path, 'Write', { mime: 'application/octet-stream', bytes: data }, false);
  const r = vfs(path, 'Read', undefined, false);
  const back = getBlob();
  let same = back != null && back.bytes.length === n;
  for (let i = 0; same && i < n; i++) if (back.bytes[i] !== data[i]) same = false;
  show('bigblob', { write: w.body, read: r.body, len: back ? back.bytes.length : null, same });
}

function spawnSteps() {
  const wasm = `/${OUR.process.packageName}:${OUR.process.publisherNode}/pkg/guest.wasm`;
  let child;
  try {
    child = spawn('child', wasm, { tag: 'none' }, [], [OUR.process], false);
  } catch (e) {
    show('spawn', { error: errorValue(e) });
    return;
  }
  show('spawn', { child: `${child.processName}:${child.packageName}:${child.publisherNode}` });
  const target = { node: OUR.node, process: child };
  show('spawn-answer', awaitResponse(target, request({ child: 'hello child' })));
  for (const [what, name, path] of [['taken', 'child', wasm], ['missing', 'other', '/nowhere/pkg/none.wasm']]) {
    try {
      spawn(name, path, { tag: 'none' }, [], [], false);
      show(`spawn-${what}`, { error: null });
    } catch (e) {
      show(`spawn-${what}`, { error: errorValue(e) });
    }
  }
  sendRequest(target, request('bye', { expects: undefined }), undefined, undefined);
}

function timer() {
  const start = Date.now();
  sendRequest(parseAddress('our@timer:distro:sys'), request({ SetTimer: 300 }), enc.encode('timer-ctx'), undefined);
  const [kind, source, msg] = receiveOne();
  show('timer', { ...(kind === 'msg' ? messageJson(source, msg) : { error: source.kind }),
    elapsed_ms: Date.now() - start });
}

function stateSteps(value) {
  setState(enc.encode(value));
  const kept = getState();
  show('state-set', { state: kept == null ? null : dec.decode(kept) });
}

function stateClear() {
  clearState();
  show('state-cleared', { state: getState() ?? null });
}

function onExitSteps(target) {
  const req = request({ echo: 'on-exit' }, { expects: undefined, metadata: 'm' });
  setOnExit({ tag: 'requests', val: [[parseAddress(target), req, { mime: 'text/plain', bytes: enc.encode('bye') }]] });
  const got = getOnExit();
  const [addr, r, blob] = got.val[0];
  show('on-exit', { tag: got.tag, target: addrText(addr), body: dec.decode(r.body), metadata: r.metadata ?? null,
    expects: r.expectsResponse ?? null, blob: blobJson(blob) });
  setOnExit({ tag: 'restart' });
  show('on-exit-restored', { tag: getOnExit().tag });
}

function capsSteps(target) {
  const mine = ourCapabilities();
  show('caps', mine.map(capJson).sort((a, b) => (a.issuer + a.params).localeCompare(b.issuer + b.params)));
  // hand a capability we hold to the peer, which saves it and reports what it holds
  const drv = vfs(drive(), 'CreateDrive');
  const readCap = ourCapabilities().find((c) => c.params.includes('"read"') && c.params.includes(drive()));
  const got = awaitResponse(parseAddress(target), request({ take_caps: true }, { caps: readCap ? [readCap] : [] }));
  show('caps-given', { drive: drv.body, given: readCap ? capJson(readCap) : null, answer: got.body ? JSON.parse(got.body) : got });
}

function takeCaps(req) {
  const given = req.capabilities;
  saveCapabilities(given);
  const held = (c) => ourCapabilities().some((o) => o.params === c.params && addrText(o.issuer) === addrText(c.issuer));
  const saved = given.map(held);
  dropCapabilities(given);
  const dropped = given.map((c) => !held(c));
  sendResponse({ inherit: false, body: jsonBytes({ received: given.map(capJson), saved, dropped }),
    metadata: undefined, capabilities: [] }, undefined);
}

function sendErrors() {
  const missing = parseAddress(`our@nosuch:${OUR.process.packageName}:${OUR.process.publisherNode}`);
  sendRequest(missing, request('hello', { metadata: 'meta' }), enc.encode('ctx-missing'),
    { mime: 'text/plain', bytes: enc.encode('held') });
  const [kind, err, context] = receiveOne();
  show('senderr missing-local', kind === 'err' ? {
    kind: err.kind, target: addrText(err.target), context: context == null ? null : dec.decode(context),
    body: dec.decode(err.message.val.body), message: err.message.tag, blob: blobJson(err.lazyLoadBlob),
  } : { kind: null });
  show('senderr unknown-node', awaitResponse(parseAddress(`ghost.os@guest:${OUR.process.packageName}:test.os`),
    request('hello')));
  // a request expecting no response is not followed by an error (upstream drops it: no context)
  const ghost = parseAddress(`ghost.os@guest:${OUR.process.packageName}:test.os`);
  sendRequest(ghost, request('quiet', { expects: undefined }), undefined, undefined);
  sendRequest(ghost, request('loud'), enc.encode('ctx-loud'), undefined);
  const [k, e, ctx] = receiveOne();
  show('senderr unawaited', k === 'err' ? { kind: e.kind, body: dec.decode(e.message.val.body),
    context: ctx == null ? null : dec.decode(ctx) } : { kind: null });
}

function rounds(n) {  // for bench/guests.py: N awaited requests to the VFS, timed
  vfs(drive(), 'CreateDrive');
  const start = Date.now();
  for (let i = 0; i < n; i++) vfs(drive(), 'Metadata', undefined, false);
  show('rounds', { n, ms: Date.now() - start });
}

function spawns(n) {  // for bench/guests.py: N children spawned, asked once and let go, timed
  const wasm = `/${OUR.process.packageName}:${OUR.process.publisherNode}/pkg/guest.wasm`;
  const start = Date.now();
  let ok = 0;
  for (let i = 0; i < n; i++) {
    const child = spawn(`bench-${i}`, wasm, { tag: 'none' }, [], [OUR.process], false);
    const target = { node: OUR.node, process: child };
    if (awaitResponse(target, request({ child: 'hi' }), undefined, false).kind === 'response') ok += 1;
    sendRequest(target, request('bye', { expects: undefined }), undefined, undefined);
  }
  show('spawns', { n, ok, ms: Date.now() - start });
}

// Ask the peer a question it answers only after a sub-request of its own (awaited, then one
// answered through `receive`), and meanwhile send it two more requests: one expecting no answer
// (it must not become the peer's prompting message) and one it answers at once.
function prompt(target) {
  const t = parseAddress(target);
  sendRequest(t, request({ prompted: 'js' }, { expects: 15n }), enc.encode('p1'), undefined);
  sendRequest(t, request({ noise: 'quiet' }, { expects: undefined }), undefined, undefined);
  sendRequest(t, request({ noise: 'loud' }), enc.encode('p2'), undefined);
  const answers = [];
  while (answers.length < 2) {
    const [kind, a, b] = receiveOne();
    if (kind === 'err') {
      answers.push({ context: b == null ? null : dec.decode(b), error: a.kind });
    } else if (b.tag === 'request') {
      // the peer's sub-request, answered only now: after all three requests reached it
      const body = JSON.parse(dec.decode(b.val.body));
      sendResponse({ inherit: false, body: jsonBytes({ sub_answer: body.sub ?? null }), metadata: undefined,
        capabilities: [] }, undefined);
    } else {
      const ctx = b.val[1];
      answers.push({ context: ctx == null ? null : dec.decode(ctx), body: JSON.parse(dec.decode(b.val[0].body)) });
    }
  }
  answers.sort((x, y) => (x.context ?? '').localeCompare(y.context ?? ''));
  show('prompt', answers);
}

const PROMPTED = {};

// A request answered later: first an awaited sub-request (to the VFS), then one to the asker whose
// response comes through `receive`; the answer is sent in `answerLater`.
function answerPrompted(source) {
  PROMPTED.vfs = vfs(drive(), 'CreateDrive').body;
  sendRequest(source, request({ sub: 'from-js' }, { expects: 10n }), enc.encode('prompted-sub'), undefined);
}

function answerLater(source, msg) {
  if (msg.val[1] == null || dec.decode(msg.val[1]) !== 'prompted-sub') return;
  // the prompting message is again the request that started it all (Kinode restores it)
  sendResponse({ inherit: false, body: jsonBytes({ answer: 'js', vfs: PROMPTED.vfs ?? null,
    sub: JSON.parse(dec.decode(msg.val[0].body)) }), metadata: undefined, capabilities: [] }, undefined);
}

function noise(req) {
  const body = JSON.parse(dec.decode(req.body));
  if (req.expectsResponse == null) show('noise-heard', body);
  else {  // answered twice: the second finds no request waiting for it and is dropped
    for (let i = 0; i < 2; i++) {
      sendResponse({ inherit: false, body: jsonBytes({ noise: body.noise, by: 'js' }), metadata: undefined,
        capabilities: [] }, undefined);
    }
  }
}

function kernelAsk(command, inherit = false) {
  const got = awaitResponse(parseAddress('our@kernel:distro:sys'), request(command, { inherit }), undefined, false);
  return 'body' in got ? JSON.parse(got.body) : got;
}

// Install and start another process at run time as Kinode's terminal does a script
// (kinode/packages/terminal/terminal/src/lib.rs handle_run): read its wasm from the VFS,
// InitializeProcess with the bytes, message it before it runs, RunProcess; then grant and drop it
// a capability, read its persisted form back, and let it exit into its OnExit::Requests.
function kinit() {
  const pkg = `${OUR.process.packageName}:${OUR.process.publisherNode}`;
  const wasm = `/${pkg}/pkg/guest.wasm`; const kid = `kid:${pkg}`; const me = addrText(OUR);
  vfs(wasm, 'Read', undefined, false);  // the wasm is the blob now: passed on with `inherit`, as the terminal does
  const onExit = { Requests: [[me, { inherit: false, expects_response: null,
    body: Array.from(jsonBytes({ noise: 'kid-exit' })), metadata: null, capabilities: [] }, null]] };
  const init = { InitializeProcess: { id: kid, wasm_bytes_handle: wasm, wit_version: 0, on_exit: onExit,
    initial_capabilities: [{ issuer: `${OUR.node}@vfs:distro:sys`, params: '"messaging"' }], public: false } };
  const out = { init: kernelAsk(init, true) };
  const kidAddr = parseAddress(`${OUR.node}@${kid}`);
  // sent before it runs: it waits for the process (upstream's pre-boot queue)
  sendRequest(kidAddr, request({ child: 'early' }, { expects: 15n }), enc.encode('early'), undefined);
  out.run = kernelAsk({ RunProcess: kid });
  const [kind, a, b] = receiveOne();
  out.early = kind === 'msg' ? { context: dec.decode(b.val[1]), body: JSON.parse(dec.decode(b.val[0].body)) }
    : { error: a.kind };
  const cap = { issuer: me, params: '"granted"' };
  const has = { Debug: { HasCap: { on: kid, cap } } };
  sendRequest(parseAddress('our@kernel:distro:sys'),   // unanswered, as upstream
    request({ GrantCapabilities: { target: kid, capabilities: [cap] } }, { expects: undefined }), undefined, undefined);
  out.granted = kernelAsk(has);
  sendRequest(parseAddress('our@kernel:distro:sys'),   // unanswered, as upstream
    request({ DropCapabilities: { target: kid, capabilities: [cap] } }, { expects: undefined }), undefined, undefined);
  out.dropped = kernelAsk(has);
  out.persisted = kernelAsk({ Debug: { Process: kid } });
  out['no-bytes'] = kernelAsk({ InitializeProcess: { ...init.InitializeProcess, id: `kid2:${pkg}` } });
  out['run-missing'] = kernelAsk({ RunProcess: `nobody:${pkg}` });
  sendRequest(kidAddr, request('bye', { expects: undefined }), undefined, undefined);
  show('kinit', out);
}

function mpStr(text) {  // MessagePack, just what NetAction needs (rmp-serde's shapes)
  const b = enc.encode(text);
  return [...(b.length < 32 ? [0xa0 | b.length] : [0xd9, b.length]), ...b];
}

function mpBytesAsArray(data) {  // serde writes a Vec<u8> as an array of numbers
  const out = [0xdc, data.length >> 8, data.length & 0xff];
  for (const x of data) { if (x < 128) out.push(x); else out.push(0xcc, x); }
  return out;
}

function netAsk(body, blob, timeout = 5n) {
  try {
    const [, msg] = sendAndAwaitResponse(parseAddress('our@net:distro:sys'),
      { inherit: false, expectsResponse: timeout, body: new Uint8Array(body), metadata: undefined, capabilities: [] },
      { mime: undefined, bytes: blob });
    const back = getBlob();
    return { body: hex(msg.val[0].body), blob: back == null ? null : hex(back.bytes) };
  } catch (e) {
    return { error: errorValue(e).kind };
  }
}

// process_lib's net::sign and net::verify: NetAction::Sign and Verify with the bytes in the blob
function netsign() {
  const me = addrText(OUR);
  const signed = netAsk(mpStr('Sign'), enc.encode('sign me'));
  const sig = new Uint8Array((signed.blob ?? '').match(/../g)?.map((h) => parseInt(h, 16)) ?? []);
  const verify = [0x81, ...mpStr('Verify'), 0x92, ...mpStr(me), ...mpBytesAsArray(sig)];
  show('netsign', { signed, verified: netAsk(verify, enc.encode('sign me')).body ?? null,
    tampered: netAsk(verify, enc.encode('sign me!')).body ?? null,
    'not-an-action': netAsk(Array.from(enc.encode('hello net')), new Uint8Array(), 1n).error ?? null,
    private: netPrivate() });
}

// net is not public: without the messaging cap to it a request is refused; granted back through
// the kernel, it is answered again
function netPrivate() {
  const netCap = ourCapabilities().find((c) => addrText(c.issuer).endsWith('@net:distro:sys'));
  dropCapabilities([netCap]);
  const without = netAsk(mpStr('GetPeers'), new Uint8Array(), 1n);
  const p = OUR.process;
  const grant = { GrantCapabilities: { target: `${p.processName}:${p.packageName}:${p.publisherNode}`,
    capabilities: [capJson(netCap)] } };
  sendRequest(parseAddress('our@kernel:distro:sys'), request(grant, { expects: undefined }), undefined, undefined);
  return { 'without-cap': without.error ?? null, 'granted-back': netAsk(mpStr('GetPeers'), new Uint8Array()).body ?? null };
}

function unicode() {
  const text = 'héllo ✓ 🎉 \u00ff end';
  setState(enc.encode(text));
  show('unicode', { text, len: text.length, state: dec.decode(getState()) });
}

function child(parent) {  // spawned by `spawnSteps`: answer the parent's request, exit on its next
  const [kind, source, msg] = receiveOne();
  if (kind !== 'msg') return;
  const body = JSON.parse(dec.decode(msg.val.body));
  if (body.caps) {  // run as a script from the terminal (scripts.json): show what it was given
    const caps = ourCapabilities().map(capJson);
    caps.sort((x, y) => (x.issuer + x.params < y.issuer + y.params ? -1 : 1));
    show('script-caps', caps);
    show('script-root', JSON.parse(vfs('/', 'ReadDir').body));  // the root cap at work
    return;
  }
  sendResponse({ inherit: false, body: jsonBytes({ reply: `${body.child}, from ${OUR.process.processName}`,
    parent_heard: addrText(source) === parent }), metadata: undefined, capabilities: [] }, undefined);
  receiveOne();  // live on until the parent says goodbye, so its name stays taken meanwhile
}

function handle(source, msg) {
  if (msg.tag !== 'request') {
    answerLater(source, msg);
    return;
  }
  const req = msg.val;
  let body;
  try {
    body = JSON.parse(dec.decode(req.body));
  } catch (e) {
    show('bad-body', { error: String(e) });
    return;
  }
  if (typeof body === 'object' && body !== null) {
    if ('echo' in body) answerEcho(source, req);
    else if ('take_caps' in body) takeCaps(req);
    else if ('relay_read' in body) answerRelay();
    else if ('prompted' in body) answerPrompted(source);
    else if ('noise' in body) noise(req);
    return;
  }
  const [cmd, arg] = String(body).split(' ');
  switch (cmd) {
    case 'ping': show('pong', messageJson(source, msg)); break;
    case 'peer': peer(arg); break;
    case 'vfs': vfsSteps(); break;
    case 'relay': relay(arg); break;
    case 'bigblob': bigBlob(Number(arg)); break;
    case 'spawn': spawnSteps(); break;
    case 'timer': timer(); break;
    case 'state-set': stateSteps(arg); break;
    case 'state-clear': stateClear(); break;
    case 'on-exit': onExitSteps(arg); break;
    case 'caps': capsSteps(arg); break;
    case 'senderr': sendErrors(); break;
    case 'unicode': unicode(); break;
    case 'prompt': prompt(arg); break;
    case 'kinit': kinit(); break;
    case 'netsign': netsign(); break;
    case 'rounds': rounds(Number(arg)); break;
    case 'spawns': spawns(Number(arg)); break;
    case 'crash': throw new Error('crash requested');
    default: show('unknown', { cmd });
  }
}

export function init(our) {
  OUR = parseAddress(our);
  if (OUR.process.processName !== 'guest') {
    child(`${OUR.node}@guest:${OUR.process.packageName}:${OUR.process.publisherNode}`);
    return;
  }
  const state = getState();
  show('ready', { our, state: state == null ? null : dec.decode(state) });
  for (;;) {
    const [kind, a, b] = receiveOne();
    if (kind === 'err') show('send-error', { kind: a.kind });
    else handle(a, b);
  }
}
