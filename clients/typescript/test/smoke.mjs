// Runs against a real p2prc node: P2PRC_API (its URL), P2PRC_HOME (its owner's home),
// P2PRC_STRANGER_HOME (another node's home, not trusted). Exits non-zero on any failure.
import assert from "node:assert/strict";
import { P2PRCClient, P2PRCError, loadIdentity } from "../dist/index.js";

const api = process.env.P2PRC_API;
const owner = new P2PRCClient(api, loadIdentity(process.env.P2PRC_HOME));
const stranger = new P2PRCClient(api, loadIdentity(process.env.P2PRC_STRANGER_HOME));
const anonymous = new P2PRCClient(api);

const status = await owner.status();
assert.match(status.node_id, /^[0-9a-f]{32}$/);
const specs = await owner.specs();
assert.ok(specs.cpu.cores >= 1 && specs.memory.total > 0 && Array.isArray(specs.gpus));
assert.equal((await owner.whoami()).role, "owner");

const view = await owner.setMetadata("set from TypeScript", { lang: "ts" });
assert.equal(view.metadata, "set from TypeScript");
const me = (await anonymous.peers()).find((peer) => peer.me);
assert.equal(me.metadata, "set from TypeScript");
assert.deepEqual(me.custom, { lang: "ts" });

const apiPort = Number(new URL(api).port);
const mapped = await owner.mapPort(apiPort);
assert.equal(mapped.PortNo, apiPort);
assert.equal(mapped.EntireAddress, `${mapped.IPAddress}:${apiPort}`);
assert.equal(mapped.udp, false);
const udp = await owner.mapPort(apiPort, { udp: true });
assert.equal(udp.udp, true);
assert.equal((await owner.mappings()).length, 2);
await owner.unmapPort(apiPort, true);
await owner.unmapPort(apiPort);
assert.deepEqual(await owner.mappings(), []);
await assert.rejects(owner.mapPort(apiPort, { domain: "not a domain" }), (error) => error.code === "invalid_request");

await assert.rejects(stranger.whoami(), (error) => error instanceof P2PRCError && error.code === "not_trusted");
await assert.rejects(anonymous.setMetadata("nope"), (error) => error.code === "unauthenticated");
await assert.rejects(owner.createContainer({ cpus: 999 }), (error) => error.code === "limit_exceeded");
if (process.env.P2PRC_CREATE === "1") {
  const progress = [];
  const box = await owner.createContainer({ ports: 1 }, (line) => progress.push(line));
  assert.ok(progress.includes("waiting for sshd"));
  assert.equal(box.ssh.user, "p2prc");
  assert.equal((await owner.containers()).length, 1);
  await owner.removeContainer(box.id);
  assert.equal((await owner.containers()).length, 0);
  console.log("typescript client: container created and removed");
}
// Jobs: alone, the node has no peer to place a rank on, so the job fails with the reason.
const submitted = await owner.submitJob({ run: ["echo", "hi"] });
assert.match(submitted.id, /^job[0-9a-f]{12}$/);
const events = [];
for await (const event of owner.jobLogs(submitted.id, true)) events.push(event);
assert.equal(events[0].log.line, "submitted: 1 rank(s)");
const finished = events.at(-1);
assert.equal(finished.event, "finished");
assert.equal(finished.job.state, "failed");
assert.match(finished.job.reason, /no peer could take rank 0/);
assert.equal((await owner.job(submitted.id.slice(0, 8))).id, submitted.id);
assert.ok((await owner.jobs()).some((job) => job.id === submitted.id));
assert.equal((await owner.cancelJob(submitted.id)).state, "failed");
await assert.rejects(owner.jobResults(submitted.id), (error) => error.code === "job_error");
await assert.rejects(owner.job("jobffffffffffff"), (error) => error.code === "job_not_found" && error.status === 404);
await assert.rejects(stranger.jobs(), (error) => error instanceof P2PRCError && error.status === 403);

// Dask clusters: the routes answer the owner only, a bad request and an unknown cluster clearly.
assert.ok(Array.isArray(await owner.clusters()));
await assert.rejects(owner.cluster("nosuchcluster"), (error) => error.code === "cluster_not_found" && error.status === 404);
await assert.rejects(owner.scaleCluster("nosuchcluster", 1), (error) => error.status === 404);
await assert.rejects(owner.createCluster({ workers: 65 }), (error) => error.code === "invalid_request");
await assert.rejects(stranger.clusters(), (error) => error instanceof P2PRCError && error.status === 403);
console.log("typescript client: jobs checked");
console.log("typescript client: 10 checks passed");
