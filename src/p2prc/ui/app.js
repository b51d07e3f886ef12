// The p2prc dashboard: polls /ui/api/overview and redraws its tables.
// Every value is a peer's word: it goes into the page only as text (textContent).
"use strict";

const POLL_MS = 2000;
const byId = (id) => document.getElementById(id);
const short = (id) => (id ? String(id).slice(0, 12) : "");
const names = new Map();

function when(seconds) {
  if (seconds === null || seconds === undefined) return "";
  return new Date(seconds * 1000).toLocaleString();
}

// Twin: cli/_node.py _ago (the same wording in `p2prc status`).
function ago(seconds, now) {
  if (seconds === null || seconds === undefined) return "";
  const span = Math.max(0, Math.floor(now - seconds));
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
    if (span >= size) return `${Math.floor(span / size)}${unit} ago`;
  }
  return `${span}s ago`;
}

function lastCall(peer, now) {
  const call = peer.last_call;
  if (!call) return ["", ""];
  return [`${call.ok ? "ok" : call.error} ${ago(call.at, now)}`, call.ok ? "call-ok" : "call-error"];
}

function peerName(nodeId) {
  if (!nodeId) return "";
  const name = names.get(nodeId);
  return name ? `${name} (${short(nodeId)})` : short(nodeId);
}

function cell(value, className) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "" : String(value);
  if (className) td.className = className;
  return td;
}

function fill(tableId, rows, columns, empty) {
  const body = byId(tableId).tBodies[0];
  const fresh = [];
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const column of columns) {
      const [value, className] = column(row);
      tr.appendChild(cell(value, className));
    }
    fresh.push(tr);
  }
  if (fresh.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(empty, "empty");
    td.colSpan = byId(tableId).tHead.rows[0].cells.length;
    tr.appendChild(td);
    fresh.push(tr);
  }
  body.replaceChildren(...fresh);
  const count = byId(`${tableId}-count`);
  if (count) count.textContent = `(${rows.length})`;
}

function path(peer) {
  if (peer.relay) return `relay via ${peerName(peer.relay)}`;
  if (peer.behind_nat) return "behind NAT";
  return "direct";
}

function ssh(view) {
  return view.ssh ? `${view.ssh.user}@${view.ssh.host}:${view.ssh.port}` : "";
}

function ports(view) {
  return (view.ports || [])
    .map((p) => `${p.container_port}→${p.public || p.host_port}`)
    .join(", ");
}

function render(data) {
  names.clear();
  const everyone = data.me ? [data.me, ...data.peers] : data.peers;
  for (const peer of everyone) names.set(peer.node_id, peer.name);
  const me = data.me;
  byId("node-name").textContent = me ? me.name : "node";
  const nat = data.behind_nat === null ? "NAT unknown" : data.behind_nat ? "behind NAT" : "public";
  byId("node-line").textContent = me ? `${me.node_id} · ${nat} · API ${me.api}` : nat;
  document.title = me ? `p2prc ${me.name}` : "p2prc node";

  fill("peers", data.peers, [
    (p) => [p.name],
    (p) => [short(p.node_id), "mono"],
    (p) => [p.state, `state-${p.state}`],
    (p) => [path(p)],
    (p) => [p.rtt_ms === null ? "" : p.rtt_ms.toFixed(1)],
    (p) => [p.gpus],
    (p) => [p.cores],
    (p) => [ago(p.last_heard, data.at)],
    (p) => lastCall(p, data.at),
    (p) => [p.public_api || p.api, "mono"],
  ], "no peers known yet");

  fill("hosted", data.hosted, [
    (c) => [c.id, "mono"],
    (c) => [c.name],
    (c) => [peerName(c.owner)],
    (c) => [c.image],
    (c) => [ssh(c), "mono"],
    (c) => [ports(c), "mono"],
    (c) => [c.gpus],
    (c) => [c.status, `state-${c.status}`],
    (c) => [when(c.expires_at) || "never"],
  ], "no containers on this node");

  fill("tracked", data.tracked, [
    (t) => [t.container.id, "mono"],
    (t) => [t.container.name],
    (t) => [peerName(t.container.peer) || t.peer_address],
    (t) => [t.container.image],
    (t) => [ssh(t.container), "mono"],
    (t) => [ports(t.container), "mono"],
    (t) => [t.container.status, `state-${t.container.status}`],
    (t) => [when(t.container.expires_at) || "never"],
  ], "no containers created on peers");

  fill("jobs", data.jobs, [
    (j) => [short(j.id), "mono"],
    (j) => [j.state, `state-${j.state}`],
    (j) => [(j.placements || []).length],
    (j) => [j.reason],
    (j) => [when(j.created_at)],
    (j) => [when(j.finished_at)],
  ], "no jobs");

  fill("mappings", data.mappings, [
    (m) => [m.local_port],
    (m) => [m.EntireAddress, "mono"],
    (m) => [m.udp ? "udp" : "tcp"],
    (m) => [m.relay ? peerName(m.relay) : "this node"],
    (m) => [m.domain || ""],
  ], "no ports mapped");

  const relay = data.relay;
  byId("relay-line").textContent = relay
    ? `port ${relay.port} · ${relay.tunnels.length} tunnels · ${relay.streams} streams` +
      (relay.forwarded_bytes === null ? "" : ` · ${relay.forwarded_bytes} bytes forwarded`)
    : "this node runs no relay";
  fill("relay", relay ? relay.tunnels : [], [
    (t) => [peerName(t.node_id)],
    (t) => [t.ports],
    (t) => [t.streams],
  ], "no tunnels");
}

let timer = null;

async function poll() {
  const live = byId("live");
  try {
    const answer = await fetch("/ui/api/overview", { credentials: "same-origin", cache: "no-store" });
    if (answer.status === 401) {
      byId("content").hidden = true;
      byId("login").hidden = false;
      live.textContent = "not logged in";
      return; // no polling without a session
    }
    if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
    render(await answer.json());
    byId("login").hidden = true;
    if (byId("content").hidden) {
      byId("content").hidden = false;
      // When the first full page is on screen (the benchmark reads this mark).
      requestAnimationFrame(() => performance.mark("p2prc-first-paint"));
    }
    live.className = "muted";
    live.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    live.className = "muted stale";
    live.textContent = `cannot reach the node (${error.message}); retrying`;
  }
  timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  if (timer === null) poll();
});
