/**
 * A typed client for the p2prc node HTTP API (see docs/openapi.json and docs/library.md).
 *
 * Read routes need nothing; state-changing routes are signed with the caller's Ed25519
 * node key, read from a p2prc home (`identity/id_ed25519`, OpenSSH format).
 */
import { createHash, createPrivateKey, randomBytes, sign, type KeyObject } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";

export interface NodeStatus {
  node_id: string;
  name: string;
  version: string;
  api: string;
  addresses: string[];
  port: number;
  public_key: string;
  uptime_s: number;
  started_at: number;
  trust_mode: string;
}

export interface Specs {
  hostname: string;
  os: { system: string; release: string; machine: string; distribution: string };
  cpu: { model: string; cores: number; physical_cores: number | null; load_1m: number };
  memory: { total: number; available: number };
  disk: { path: string; total: number; free: number };
  gpus: { index: number; name: string; memory_total: number; driver: string }[];
}

export interface PeerView {
  node_id: string;
  name: string;
  me: boolean;
  state: "alive" | "suspect" | "dead" | "left";
  rtt_ms: number | null;
  addresses: string[];
  api: string;
  api_port: number;
  gossip_port: number;
  behind_nat: boolean | null;
  relay: string;
  user: string;
  cores: number;
  memory: number;
  gpus: number;
  metadata: string;
  custom: Record<string, string>;
  /** The node's own "p2prc." keys (direct port, attached-host version), set by p2prc. */
  reserved: Record<string, string>;
  version: number;
}

export interface CallerInfo {
  node_id: string;
  role: "owner" | "peer";
  public_key: string;
}

export interface CreateContainer {
  name?: string;
  image?: string;
  ports?: number;
  gpu?: boolean;
  cpus?: number;
  memory?: string;
  ttl?: string;
  authorized_keys?: string[];
}

export interface ContainerView {
  id: string;
  name: string;
  peer: string;
  image: string;
  ssh: { host: string; port: number; user: string };
  ports: { container_port: number; host_port: number }[];
  gpu: boolean;
  cpus: number;
  memory: number;
  owner: string;
  created_at: number;
  expires_at: number | null;
  status: string;
}

/** Where a published port is reachable (the original P2PRC's keys, plus p2prc's). */
export interface MappedPort {
  IPAddress: string;
  PortNo: number;
  EntireAddress: string;
  local_port: number;
  relay: string;
  domain: string | null;
  udp: boolean;
}

/** Options of `mapPort`: route a domain to the port (HTTP Host, TLS SNI), or map UDP. */
export interface MapPortOptions {
  domain?: string;
  udp?: boolean;
}

/** A job's description (POST /jobs); only `run` is required. */
export interface Task {
  image?: string;
  resources?: { cpus?: number; memory?: string; gpus?: number };
  setup?: string | string[];
  run: string | string[];
  env?: Record<string, string>;
  workdir?: string;
  outputs?: string[];
  nodes?: number;
  ports?: number;
  time_limit?: string | number;
  retries?: number;
  peers?: string[];
  keep?: boolean;
}

export type JobState =
  | "pending"
  | "placing"
  | "running"
  | "succeeded"
  | "failed"
  | "cancelled"
  | "oom"
  | "timed_out";

/** Where one rank runs (or ran), and the peers skipped on the way there. */
export interface RankPlacement {
  rank: number;
  peer: string;
  container: ContainerView | null;
  attempt: number;
  exit_code: number | null;
  log_offset: number;
  skipped: string[];
}

/** A job as its submitting node keeps it. */
export interface JobView {
  id: string;
  task: Task;
  state: JobState;
  reason: string;
  created_at: number;
  finished_at: number | null;
  placements: RankPlacement[];
}

/** One line a rank wrote (rank null: a line of the job layer itself). */
export interface LogLine {
  rank: number | null;
  line: string;
  time: number;
}

/** One NDJSON line of GET /jobs/{id}/logs: a log line, or the job once it ends. */
export interface JobEvent {
  event: "log" | "finished";
  log?: LogLine | null;
  job?: JobView | null;
}

/** One file a job brought back, relative to its results. */
export interface ResultFile {
  path: string;
  size: number;
}

/** What POST /clusters asks for: a Dask cluster's workers, their size, and where. */
export interface ClusterCreate {
  workers?: number;
  worker?: { cpus?: number; memory?: string; gpus?: number };
  threads?: number;
  peers?: string[];
  scheduler_peer?: string;
  name?: string;
  image?: string;
  timeout?: number;
}

export type ClusterState = "starting" | "running" | "failed" | "closed";

export type WorkerState = "starting" | "running" | "lost" | "failed";

/** One Dask worker: its container, its peer, the address Dask knows it by. */
export interface WorkerView {
  name: string;
  peer: string;
  state: WorkerState;
  address: string;
  container: ContainerView | null;
  reason: string;
  skipped: string[];
}

/** A Dask cluster as its owner's node keeps it; `security` names the client's TLS files. */
export interface ClusterView {
  id: string;
  name: string;
  state: ClusterState;
  reason: string;
  scheduler_address: string;
  dashboard_link: string;
  scheduler_peer: string;
  scheduler: ContainerView | null;
  security: { ca_file: string; cert_file: string; key_file: string } | null;
  workers: WorkerView[];
  versions: Record<string, string>;
  created_at: number;
  closed_at: number | null;
}

/** An error answered by a node: the same `code` the Python client maps to its classes. */
export class P2PRCError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly status: number,
  ) {
    super(`${code}: ${message}`);
    this.name = "P2PRCError";
  }
}

/** A node key pair, as p2prc stores it. */
export interface Identity {
  privateKey: KeyObject;
  publicKey: Buffer;
}

function b64url(data: Buffer): string {
  return data.toString("base64url");
}

/** Read `identity/id_ed25519` (OpenSSH format, unencrypted) from a p2prc home. */
export function loadIdentity(home: string): Identity {
  const text = readFileSync(join(home, "identity", "id_ed25519"), "utf8");
  const body = text
    .replace(/-----(BEGIN|END) OPENSSH PRIVATE KEY-----/g, "")
    .replace(/\s+/g, "");
  const data = Buffer.from(body, "base64");
  let offset = 0;
  const magic = "openssh-key-v1\0";
  if (data.subarray(0, magic.length).toString("latin1") !== magic) {
    throw new Error("not an OpenSSH private key");
  }
  offset = magic.length;
  const field = (): Buffer => {
    const length = data.readUInt32BE(offset);
    const value = data.subarray(offset + 4, offset + 4 + length);
    offset += 4 + length;
    return value;
  };
  const cipher = field().toString();
  field(); // kdf name
  field(); // kdf options
  if (cipher !== "none") throw new Error("encrypted keys are not supported");
  offset += 4; // number of keys
  field(); // public key blob
  const secret = field();
  let inner = 8; // two check integers
  const innerField = (): Buffer => {
    const length = secret.readUInt32BE(inner);
    const value = secret.subarray(inner + 4, inner + 4 + length);
    inner += 4 + length;
    return value;
  };
  if (innerField().toString() !== "ssh-ed25519") throw new Error("not an Ed25519 key");
  const publicKey = Buffer.from(innerField());
  const seed = innerField().subarray(0, 32);
  const privateKey = createPrivateKey({
    key: { kty: "OKP", crv: "Ed25519", d: b64url(seed), x: b64url(publicKey) },
    format: "jwk",
  });
  return { privateKey, publicKey };
}

/** Talks to one node; signs state-changing calls when it has an identity. */
export class P2PRCClient {
  private audience: string | undefined;

  constructor(
    readonly baseUrl: string,
    private readonly identity?: Identity,
  ) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
  }

  status(): Promise<NodeStatus> {
    return this.request<NodeStatus>("GET", "/status");
  }

  specs(): Promise<Specs> {
    return this.request<Specs>("GET", "/specs");
  }

  peers(): Promise<PeerView[]> {
    return this.request<PeerView[]>("GET", "/peers");
  }

  whoami(): Promise<CallerInfo> {
    return this.request<CallerInfo>("POST", "/whoami");
  }

  setMetadata(text: string, custom?: Record<string, string>): Promise<PeerView> {
    return this.request<PeerView>("POST", "/meta", custom ? { text, custom } : { text });
  }

  /** Publish one of the node's local ports (through a relay when it is behind NAT). */
  mapPort(port: number, options: MapPortOptions = {}): Promise<MappedPort> {
    const body: Record<string, unknown> = { port };
    if (options.domain !== undefined) body.domain = options.domain;
    if (options.udp) body.udp = true;
    return this.request<MappedPort>("POST", "/map-port", body);
  }

  /** The node's published ports (owner only). */
  mappings(): Promise<MappedPort[]> {
    return this.request<MappedPort[]>("GET", "/map-port", undefined, true);
  }

  /** Stop publishing a port (owner only). */
  unmapPort(port: number, udp = false): Promise<{ unmapped: number }> {
    return this.request("DELETE", `/map-port/${port}${udp ? "?udp=true" : ""}`);
  }

  containers(): Promise<ContainerView[]> {
    return this.request<ContainerView[]>("GET", "/containers", undefined, true);
  }

  removeContainer(id: string): Promise<{ removed: string }> {
    return this.request("DELETE", `/containers/${encodeURIComponent(id)}`);
  }

  /** Create a container on this node; `onProgress` gets each progress line. */
  async createContainer(
    spec: CreateContainer = {},
    onProgress?: (message: string) => void,
  ): Promise<ContainerView> {
    const response = await this.send("POST", "/containers", spec, false);
    const text = await response.text();
    for (const line of text.split("\n")) {
      if (!line.trim()) continue;
      const event = JSON.parse(line) as {
        event: string;
        message?: string;
        container?: ContainerView;
        error?: { code: string; message: string };
      };
      if (event.event === "progress" && event.message) onProgress?.(event.message);
      if (event.event === "error" && event.error) {
        throw new P2PRCError(event.error.code, event.error.message, response.status);
      }
      if (event.event === "created" && event.container) return event.container;
    }
    throw new P2PRCError("peer_protocol_error", "the stream ended without a result", 502);
  }

  /** Start a job on the pool (owner only); answers at once with its id. */
  submitJob(task: Task): Promise<JobView> {
    return this.request<JobView>("POST", "/jobs", task);
  }

  /** Every job this node submitted, oldest first (owner only). */
  jobs(): Promise<JobView[]> {
    return this.request<JobView[]>("GET", "/jobs", undefined, true);
  }

  /** One job, by id or unique prefix (owner only). */
  job(id: string): Promise<JobView> {
    return this.request<JobView>("GET", `/jobs/${encodeURIComponent(id)}`, undefined, true);
  }

  /** Stop every rank and remove the job's containers (owner only). */
  cancelJob(id: string): Promise<JobView> {
    return this.request<JobView>("POST", `/jobs/${encodeURIComponent(id)}/cancel`);
  }

  /** The job's log lines, then a `finished` event; `follow` waits for the job's end. */
  async *jobLogs(id: string, follow = false): AsyncGenerator<JobEvent> {
    const path = `/jobs/${encodeURIComponent(id)}/logs?follow=${follow}`;
    const response = await this.send("GET", path, undefined, true);
    const decoder = new TextDecoder();
    let pending = "";
    for await (const chunk of response.body ?? []) {
      pending += decoder.decode(chunk as Uint8Array, { stream: true });
      const lines = pending.split("\n");
      pending = lines.pop() ?? "";
      for (const line of lines) if (line.trim()) yield JSON.parse(line) as JobEvent;
    }
    if (pending.trim()) yield JSON.parse(pending) as JobEvent;
  }

  /** The files the job brought back (owner only). */
  jobResults(id: string): Promise<ResultFile[]> {
    const path = `/jobs/${encodeURIComponent(id)}/results`;
    return this.request<ResultFile[]>("GET", path, undefined, true);
  }

  /** One result file's bytes (owner only). */
  async jobResultFile(id: string, path: string): Promise<Uint8Array> {
    const parts = path.split("/").map(encodeURIComponent).join("/");
    const url = `/jobs/${encodeURIComponent(id)}/results/${parts}`;
    const response = await this.send("GET", url, undefined, true);
    return new Uint8Array(await response.arrayBuffer());
  }

  /** Start a Dask cluster (owner only); `onProgress` gets each step, then the cluster. */
  async createCluster(
    spec: ClusterCreate = {},
    onProgress?: (message: string) => void,
  ): Promise<ClusterView> {
    const response = await this.send("POST", "/clusters", spec, false);
    const text = await response.text();
    for (const line of text.split("\n")) {
      if (!line.trim()) continue;
      const event = JSON.parse(line) as {
        event: string;
        message?: string;
        cluster?: ClusterView;
        error?: { code: string; message: string };
      };
      if (event.event === "progress" && event.message) onProgress?.(event.message);
      if (event.event === "error" && event.error) {
        throw new P2PRCError(event.error.code, event.error.message, response.status);
      }
      if (event.event === "created" && event.cluster) return event.cluster;
    }
    throw new P2PRCError("peer_protocol_error", "the stream ended without a cluster", 502);
  }

  /** Every Dask cluster of this node, oldest first (owner only). */
  clusters(): Promise<ClusterView[]> {
    return this.request<ClusterView[]>("GET", "/clusters", undefined, true);
  }

  /** One cluster, by id, unique prefix or name (owner only). */
  cluster(id: string): Promise<ClusterView> {
    return this.request<ClusterView>("GET", `/clusters/${encodeURIComponent(id)}`, undefined, true);
  }

  /** Add workers, or remove the newest, until the cluster has `workers` (owner only). */
  scaleCluster(id: string, workers: number): Promise<ClusterView> {
    return this.request<ClusterView>("POST", `/clusters/${encodeURIComponent(id)}/scale`, { workers });
  }

  /** One more worker; answers when it runs (owner only). */
  addClusterWorker(id: string): Promise<WorkerView> {
    return this.request<WorkerView>("POST", `/clusters/${encodeURIComponent(id)}/workers`);
  }

  /** Remove one worker and its container (owner only). */
  removeClusterWorker(id: string, worker: string): Promise<ClusterView> {
    const path = `/clusters/${encodeURIComponent(id)}/workers/${encodeURIComponent(worker)}`;
    return this.request<ClusterView>("DELETE", path);
  }

  /** Close a cluster: every container removed (owner only). */
  removeCluster(id: string): Promise<ClusterView> {
    return this.request<ClusterView>("DELETE", `/clusters/${encodeURIComponent(id)}`);
  }

  private async request<T>(
    method: string,
    path: string,
    body?: unknown,
    signedRead = false,
  ): Promise<T> {
    const response = await this.send(method, path, body, signedRead);
    return (await response.json()) as T;
  }

  private async send(
    method: string,
    path: string,
    body: unknown,
    signedRead: boolean,
  ): Promise<Response> {
    const payload = body === undefined ? Buffer.alloc(0) : Buffer.from(JSON.stringify(body));
    const headers: Record<string, string> = {};
    if (body !== undefined) headers["content-type"] = "application/json";
    if ((method !== "GET" || signedRead) && this.identity) {
      Object.assign(headers, await this.signature(method, path, payload));
    }
    const response = await fetch(this.baseUrl + path, {
      method,
      headers,
      body: payload.length ? payload : undefined,
    });
    if (!response.ok) {
      const error = ((await response.json().catch(() => ({}))) as {
        error?: { code: string; message: string };
      }).error;
      throw new P2PRCError(
        error?.code ?? "api_error",
        error?.message ?? `HTTP ${response.status}`,
        response.status,
      );
    }
    return response;
  }

  private async signature(
    method: string,
    target: string,
    body: Buffer,
  ): Promise<Record<string, string>> {
    const identity = this.identity!;
    this.audience ??= (await this.status()).node_id;
    const timestamp = Math.floor(Date.now() / 1000).toString();
    const nonce = randomBytes(16).toString("hex");
    const digest = createHash("sha256").update(body).digest("hex");
    const message = ["p2prc-request-v1", method.toUpperCase(), target, this.audience, timestamp, nonce, digest].join("\n");
    return {
      "P2PRC-Key": b64url(identity.publicKey),
      "P2PRC-Audience": this.audience,
      "P2PRC-Timestamp": timestamp,
      "P2PRC-Nonce": nonce,
      "P2PRC-Signature": b64url(sign(null, Buffer.from(message), identity.privateKey)),
    };
  }
}
