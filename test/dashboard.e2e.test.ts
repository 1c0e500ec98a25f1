// End to end: the head's web dashboard in a real browser. `drover up` starts two real
// local agents with the FAKE nvidia-smi (test/fakes/nvidia-smi) first on PATH; a small
// Python trainer reports a loss every step and a checkpoint every 5 through the agent
// socket; Debian's Chromium (driven by playwright-core over CDP, no browser download)
// opens the address `drover dashboard` prints. The page must show both nodes with GPU
// telemetry, gain loss points as steps complete, and mark the restart that a kill -9 of
// one node's agent causes on the step axis. Without the admin token the head answers 401.
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { chromium, type Browser } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { repoRoot, runDrover } from "./drover-cli.js";
import { waitFor } from "./wait-for.js";

const CHROMIUM = "/usr/bin/chromium";
const chromiumMissing = !existsSync(CHROMIUM);
if (chromiumMissing && process.env.CI === "true") {
  throw new Error(`${CHROMIUM} is missing: CI installs Debian's chromium in .ci/run (apt-get install -y --no-install-recommends chromium)`);
}
if (chromiumMissing) console.log(`dashboard e2e skipped: ${CHROMIUM} is missing (apt-get install -y chromium)`);

/** Steps 0.25 s apart, a checkpoint every 5; a resumed attempt starts after the step its checkpoint holds. */
const TRAINER = `
import json, os, socket, sys, time
rank = int(os.environ["RANK"])
start = 0
resume = os.environ.get("DROVER_RESUME_DIR")
if resume:
    with open(os.path.join(resume, f"rank{rank}.step")) as f:
        start = int(f.read())
agent = socket.socket(socket.AF_UNIX)
agent.connect(os.environ["DROVER_AGENT_SOCKET"])
def send(message):
    agent.sendall((json.dumps({"v": 1, "rank": rank, **message}) + "\\n").encode())
for step in range(start + 1, int(sys.argv[1]) + 1):
    time.sleep(0.25)
    send({"kind": "metric", "step": step, "values": {"loss": 4.0 / (1 + 0.1 * step), "images_per_s": 512.0}})
    if step % 5 == 0:
        ckpt = os.path.join(os.environ["DROVER_CKPT_DIR"], str(step))
        os.makedirs(ckpt, exist_ok=True)
        with open(os.path.join(ckpt, f"rank{rank}.step"), "w") as f:
            f.write(str(step))
        send({"kind": "checkpoint", "step": step, "dir": ckpt, "files": [f"rank{rank}.step"]})
    print(f"step {step}", flush=True)
agent.close()
`;

interface JobSnapshot { jobId: string; attempt: number; lastCommittedStep?: number; latestMetrics: Record<number, { step: number }> }

describe.skipIf(chromiumMissing)("the web dashboard in Chromium, end to end", { timeout: 120_000 }, () => {
  let stateDir: string;
  let upOutput: string;
  let browser: Browser | undefined;
  const env = {
    PATH: `${join(repoRoot, "test", "fakes")}:${process.env.PATH ?? ""}`,
    // GPU 1 of every node reports 91 C and thermal slowdown: the page lists the alerts.
    FAKE_NVIDIA_SMI_MODE: "hot",
    DROVER_TELEMETRY_INTERVAL: "1s",
  };

  beforeAll(async () => {
    stateDir = await mkdtemp(join(os.tmpdir(), "drover-dashboard-e2e-"));
    const spec = join(stateDir, "cluster.yaml");
    await writeFile(spec, "name: dashboard\nhead:\n  heartbeatInterval: 500ms\n  heartbeatTimeout: 3s\nlocal:\n  nodes: 2\n  ranksPerNode: 1\n");
    const up = await runDrover(stateDir, ["up", spec], 60_000, env);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    upOutput = up.stdout;
  });
  afterAll(async () => {
    await browser?.close();
    await runDrover(stateDir, ["down"], 60_000);
    await rm(stateDir, { recursive: true, force: true });
  });

  it("refuses requests without the admin token, and keeps /metrics open", async () => {
    const adminToken = (JSON.parse(await readFile(join(stateDir, "admin-token"), "utf8")) as { adminToken: string }).adminToken;
    const metricsUrl = (JSON.parse(await readFile(join(stateDir, "metrics.json"), "utf8")) as { url: string }).url;
    const dashboardUrl = metricsUrl.replace(/\/metrics$/, "/dashboard");
    expect(upOutput).toContain(`dashboard: ${dashboardUrl}`);
    expect(upOutput).not.toContain(adminToken);
    for (const path of ["", "/dashboard.js", "/api/cluster", "/api/job", "/api/logs", "/events"]) {
      expect((await fetch(dashboardUrl + path)).status, path).toBe(401);
    }
    expect((await fetch(`${dashboardUrl}?token=wrong`)).status).toBe(401);
    expect((await fetch(`${dashboardUrl}/api/job`, { headers: { cookie: "drover_dashboard=wrong" } })).status).toBe(401);
    expect((await fetch(metricsUrl)).status).toBe(200);
    const opened = await fetch(`${dashboardUrl}?token=${encodeURIComponent(adminToken)}`, { redirect: "manual" });
    expect(opened.status).toBe(303);
    expect(opened.headers.get("location")).toBe("/dashboard");
    expect(opened.headers.get("set-cookie")).toMatch(/HttpOnly; SameSite=Strict; Path=\/dashboard$/);
  });

  it("shows both nodes, a loss curve that grows, and the restart a kill -9 causes", async () => {
    const printed = await runDrover(stateDir, ["dashboard"], 15_000);
    expect(printed.code, printed.stderr).toBe(0);
    const address = printed.stdout.trim();
    expect(address).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/dashboard\?token=\S+$/);

    const jobDir = join(stateDir, "job");
    await mkdir(jobDir, { recursive: true });
    await writeFile(join(jobDir, "train.py"), TRAINER);
    const submit = await runDrover(stateDir, ["submit", "--no-wait", "--run-id", "dashboard-run", "--working-dir", jobDir, "--", "python", "train.py", "60"], 30_000, env);
    expect(submit.code, submit.stdout + submit.stderr).toBe(0);
    const jobId = /submitted (\S+)/.exec(submit.stdout)![1]!;
    const job = async () => (JSON.parse(await readFile(join(stateDir, "cluster.json"), "utf8")) as { jobs: JobSnapshot[] }).jobs.find((candidate) => candidate.jobId === jobId);

    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, chromiumSandbox: false });
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    await page.goto(address);
    // The token left the address bar; an HttpOnly cookie carries it.
    expect(new URL(page.url()).search).toBe("");
    const cookies = await context.cookies();
    expect(cookies.find((cookie) => cookie.name === "drover_dashboard")).toMatchObject({ httpOnly: true, sameSite: "Strict" });

    // Both nodes, connected, with the fake nvidia-smi's two GPUs and their sparklines.
    await page.locator('.node[data-node="local-0"][data-connection="connected"] .gpu').nth(1).waitFor({ timeout: 20_000 });
    await page.locator('.node[data-node="local-1"][data-connection="connected"] .gpu').nth(1).waitFor({ timeout: 20_000 });
    expect(await page.locator(".node .utilization-sparkline polyline").count()).toBeGreaterThanOrEqual(4);
    expect(await page.locator('.node[data-node="local-0"] .gpu[data-gpu="1"]').textContent()).toContain("91 °C");
    // The head's alerts, as status prints them (checked every 5 s).
    await page.locator('#alerts .alert[data-kind="gpu-temperature"][data-node="local-1"]').waitFor({ timeout: 20_000 });
    expect(await page.locator("#alerts").textContent()).toMatch(/warning: .*local-0.*91/);

    // The loss chart gains points as steps complete (pushed over SSE, no reload).
    const lossPoints = page.locator("#loss-chart circle.loss-point");
    await waitFor(async () => (await lossPoints.count()) >= 3, 20_000, "the first loss points", 200);
    const earlier = await lossPoints.count();
    await waitFor(async () => (await lossPoints.count()) >= earlier + 4, 20_000, "more loss points", 200);

    // Kill -9 local-1's agent once a checkpoint is committed and training went past it.
    await waitFor(async () => {
      const current = await job();
      const step = current?.latestMetrics[0]?.step;
      return current?.lastCommittedStep !== undefined && step !== undefined && step >= current.lastCommittedStep + 2;
    }, 30_000, "a committed checkpoint and 2 steps past it", 200);
    const nodes = JSON.parse(await readFile(join(stateDir, "local-nodes.json"), "utf8")) as { entries?: Array<{ nodeName: string; pid: number }> } | Array<{ nodeName: string; pid: number }>;
    const victim = (Array.isArray(nodes) ? nodes : nodes.entries ?? []).find((node) => node.nodeName === "local-1")!;
    process.kill(victim.pid, "SIGKILL");

    // The restart shows on the step axis at the step the next attempt resumed from, and attempt 2's points follow.
    const marker = page.locator("#loss-chart line.restart-marker");
    // "attached": a vertical line has no width, so Playwright would call it hidden.
    await marker.first().waitFor({ state: "attached", timeout: 45_000 });
    const resumedFrom = Number(await marker.first().getAttribute("data-step"));
    expect(resumedFrom).toBeGreaterThanOrEqual(5);
    expect(await page.locator("#loss-chart line.checkpoint-marker").count()).toBeGreaterThanOrEqual(1);
    await page.locator('#loss-chart circle.loss-point[data-attempt="2"]').nth(2).waitFor({ timeout: 45_000 });
    const attempt2Steps = await page.locator('#loss-chart circle.loss-point[data-attempt="2"]').evaluateAll((dots) => dots.map((dot) => Number(dot.getAttribute("data-step"))));
    expect(Math.min(...attempt2Steps)).toBe(resumedFrom + 1);
    expect(["running", "finishing", "succeeded"]).toContain(await page.locator(".facts").getAttribute("data-state"));
    expect(await page.locator("#logs").textContent()).toContain("step ");

    // A few more steps of attempt 2, so the screenshot shows the curve going on past the restart.
    await page.locator('#loss-chart circle.loss-point[data-attempt="2"]').nth(8).waitFor({ timeout: 20_000 }).catch(() => undefined);
    await mkdir(join(repoRoot, "docs"), { recursive: true });
    // The README's picture is replaced only when asked (DROVER_UPDATE_SCREENSHOT=1): a test
    // run must not leave a tracked file modified.
    const screenshot = process.env.DROVER_UPDATE_SCREENSHOT === "1" ? join(repoRoot, "docs", "dashboard.png") : join(stateDir, "dashboard.png");
    await page.screenshot({ path: screenshot, fullPage: true });

    // The token is never logged by the head.
    const adminToken = (JSON.parse(await readFile(join(stateDir, "admin-token"), "utf8")) as { adminToken: string }).adminToken;
    expect(await readFile(join(stateDir, "head.log"), "utf8")).not.toContain(adminToken);
  });
});
